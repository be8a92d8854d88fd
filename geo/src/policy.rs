//! The geofence policy engine: `[geofence]` compiled into bitsets, evaluated without I/O or
//! allocation on the allow path.
//!
//! # Semantics
//!
//! [`Policy::check_serve`] evaluates, in this order, and the first deny wins:
//! 1. The configured rules, in file order; disabled rules are dropped at compile time. A rule
//!    *applies* when the node's GPU class is in its `gpu_classes` (empty: every class) and the
//!    workload is in its `workloads` (empty: every kind). An applying rule denies when the
//!    client is in `deny_client_countries` (side [`Side::Client`]), the node is in
//!    `deny_node_countries` ([`Side::Node`]), or the client is in `residency_client_countries`
//!    and the node is not in `residency_node_countries` ([`Side::Pair`]).
//! 2. `anonymous-ip`: a side whose Anonymous-IP flags include one of `anonymous_flags` is
//!    denied when the policy is `deny`, or `deny_controlled` and the class is controlled.
//! 3. `unknown-location`: a side without a country is denied when `unknown_location_controlled`
//!    (controlled class) or `unknown_location_uncontrolled` (other classes) is `deny`.
//!
//! Country rules only look at *known* locations, unless the rule says otherwise: with a rule's
//! `unknown_location = "allow"` (the default), a side with no country never matches its deny
//! lists and never fails its residency requirement, so that step 3 alone decides about it
//! ("treat the location as allowed by every country rule" when that policy is `allow`). With
//! `unknown_location = "deny"` the rule assumes the worst about a side with no country: it is
//! in every deny list and in the residency client list, and not in the residency node list, so
//! the rule denies it under its own name, whatever step 3 says. Sanctions rules use this to
//! fail closed for places no database can name.
//!
//! A set member may be a country (`UA`, matching every location in Ukraine) or a subdivision
//! (`UA-43`, matching only locations whose subdivision is `UA-43`). Subdivisions come only from
//! a City database (or an override): with a country-only database, including the embedded one,
//! a location in Crimea is just `UA` and a `UA-43` member cannot match it.
//!
//! [`Policy::check_onboard`] checks a node alone: the rules' `deny_node_countries` (for rules
//! that apply to the class and to every workload kind, since a node is not onboarded for one
//! workload; workload-limited rules are enforced when serving), then steps 2 and 3 for the node.
//!
//! [`Policy::check_client`] checks a client alone ("may a client here use this class at all"):
//! `deny_client_countries`, then steps 2 and 3 for the client. Node-side and residency rules
//! need a node location and are left to `check_serve`.
//!
//! Note on nodes and `hosting_provider`: the anonymous policy applies to node addresses too,
//! and most GPU servers sit in hosting ranges. With the default flags (all six) and
//! `deny_controlled`, a node with a controlled class in a range the Anonymous-IP database
//! flags as hosting is refused; operators who run nodes in data centres should drop
//! `hosting_provider` from `anonymous_flags`.
//!
//! # GPU classes
//!
//! Class names compare case-insensitively and ignore spaces, hyphens and underscores (`RTX
//! 4090`, `rtx-4090` and `rtx4090` are one class; `rtx4090d` is another). Every class named in
//! the config gets a [`ClassId`]; any other name gets [`ClassId::OTHER`], which is not
//! controlled and matches only rules whose `gpu_classes` is empty.

use crate::country::{Country, Subdivision};
use crate::location::{AnonymousFlags, Location};
use nearpath_config::{AnonymousPolicy, GeofenceConfig, UnknownPolicy, WorkloadKind};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

/// Name of the rule reported when the unknown-location policy denies.
pub const UNKNOWN_LOCATION_RULE: &str = "unknown-location";
/// Name of the rule reported when the anonymous-IP policy denies.
pub const ANONYMOUS_IP_RULE: &str = "anonymous-ip";

/// The name of the rule behind a decision; cloning it is a reference-count increment.
pub type RuleName = Arc<str>;

/// A GPU class interned by [`Policy::class_id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ClassId(u16);

impl ClassId {
    /// Every class the configuration does not name.
    pub const OTHER: ClassId = ClassId(u16::MAX);

    /// Whether this is [`ClassId::OTHER`].
    pub fn is_other(self) -> bool {
        self == Self::OTHER
    }
}

/// Errors compiling a `[geofence]` section. All are configuration mistakes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("geofence: {context} refers to unknown country set @{name}")]
    UnknownSet { context: String, name: String },
    #[error("geofence: country sets refer to each other in a cycle: {cycle}")]
    SetCycle { cycle: String },
    #[error("geofence: {context}: {member:?} is not a country code (CU), a subdivision (UA-43) or a set (@name)")]
    BadMember { context: String, member: String },
    #[error("geofence: rule {rule:?}: gpu_classes refers to @{name}; only @controlled exists")]
    UnknownClassSet { rule: String, name: String },
    #[error("geofence: {context}: GPU class {class:?} is empty after normalisation")]
    BadClass { context: String, class: String },
    #[error("geofence: rule name {rule:?} is {problem}")]
    BadRuleName { rule: String, problem: &'static str },
    #[error("geofence: rule {rule:?} has residency_client_countries without residency_node_countries, or the reverse")]
    HalfResidency { rule: String },
    #[error("geofence: more than {max} distinct GPU classes")]
    TooManyClasses { max: usize },
}

const COUNTRY_WORDS: usize = (26 * 26usize).div_ceil(64);

/// A compiled country set: a bitset over the 26 x 26 two-letter space plus a short list of
/// subdivisions.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CountrySet {
    countries: [u64; COUNTRY_WORDS],
    subdivisions: Box<[Subdivision]>,
}

impl CountrySet {
    /// Whether a country is a member (subdivision members do not count).
    #[inline]
    pub fn contains_country(&self, c: Country) -> bool {
        let i = c.index();
        self.countries[i / 64] >> (i % 64) & 1 == 1
    }

    /// Whether a subdivision is a member, directly or through its country.
    pub fn contains_subdivision(&self, s: Subdivision) -> bool {
        self.contains_country(s.country()) || self.subdivisions.contains(&s)
    }

    /// Whether a location is in the set: its country is a member, or its subdivision is.
    #[inline]
    pub fn contains(&self, loc: &Location) -> bool {
        if let Some(c) = loc.country {
            if self.contains_country(c) {
                return true;
            }
        }
        match loc.subdivision {
            Some(s) if !self.subdivisions.is_empty() => self.subdivisions.contains(&s),
            _ => false,
        }
    }

    /// Whether the set has no members.
    pub fn is_empty(&self) -> bool {
        self.countries.iter().all(|w| *w == 0) && self.subdivisions.is_empty()
    }

    /// Member countries, in order.
    pub fn countries(&self) -> impl Iterator<Item = Country> + '_ {
        (0..26 * 26).filter_map(move |i| {
            if self.countries[i / 64] >> (i % 64) & 1 == 1 {
                Country::from_bytes([b'A' + (i / 26) as u8, b'A' + (i % 26) as u8])
            } else {
                None
            }
        })
    }

    /// Member subdivisions, in order.
    pub fn subdivisions(&self) -> &[Subdivision] {
        &self.subdivisions
    }

    fn from_members(members: &Members) -> Self {
        let mut set = CountrySet::default();
        for c in &members.countries {
            let i = c.index();
            set.countries[i / 64] |= 1 << (i % 64);
        }
        // A subdivision whose whole country is a member adds nothing.
        set.subdivisions = members
            .subdivisions
            .iter()
            .filter(|s| !set.contains_country(s.country()))
            .copied()
            .collect();
        set
    }
}

impl fmt::Debug for CountrySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.countries())
            .entries(self.subdivisions.iter())
            .finish()
    }
}

/// Expanded members of a set before compilation.
#[derive(Default, Clone)]
struct Members {
    countries: BTreeSet<Country>,
    subdivisions: BTreeSet<Subdivision>,
}

/// Expands `@name` references recursively, with cycle detection and memoisation.
struct SetExpander<'a> {
    defs: &'a BTreeMap<String, Vec<String>>,
    done: HashMap<String, Members>,
    stack: Vec<String>,
}

impl<'a> SetExpander<'a> {
    fn new(defs: &'a BTreeMap<String, Vec<String>>) -> Self {
        Self {
            defs,
            done: HashMap::new(),
            stack: Vec::new(),
        }
    }

    fn set(&mut self, name: &str, context: &str) -> Result<Members, PolicyError> {
        if let Some(m) = self.done.get(name) {
            return Ok(m.clone());
        }
        if let Some(pos) = self.stack.iter().position(|s| s == name) {
            let mut cycle: Vec<String> =
                self.stack[pos..].iter().map(|s| format!("@{s}")).collect();
            cycle.push(format!("@{name}"));
            return Err(PolicyError::SetCycle {
                cycle: cycle.join(" -> "),
            });
        }
        let Some(def) = self.defs.get(name) else {
            return Err(PolicyError::UnknownSet {
                context: context.to_string(),
                name: name.to_string(),
            });
        };
        self.stack.push(name.to_string());
        let result = self.list(def, &format!("country set @{name}"));
        self.stack.pop();
        let members = result?;
        self.done.insert(name.to_string(), members.clone());
        Ok(members)
    }

    fn list(&mut self, items: &[String], context: &str) -> Result<Members, PolicyError> {
        let mut m = Members::default();
        for item in items {
            let item = item.trim();
            if let Some(name) = item.strip_prefix('@') {
                let sub = self.set(name, context)?;
                m.countries.extend(sub.countries);
                m.subdivisions.extend(sub.subdivisions);
            } else if let Some(c) = Country::parse(item) {
                m.countries.insert(c);
            } else if let Some(s) = Subdivision::parse(item) {
                m.subdivisions.insert(s);
            } else {
                return Err(PolicyError::BadMember {
                    context: context.to_string(),
                    member: item.to_string(),
                });
            }
        }
        Ok(m)
    }
}

/// A bitset over class ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ClassSet(Vec<u64>);

impl ClassSet {
    fn insert(&mut self, id: ClassId) {
        let i = id.0 as usize;
        if self.0.len() <= i / 64 {
            self.0.resize(i / 64 + 1, 0);
        }
        self.0[i / 64] |= 1 << (i % 64);
    }

    #[inline]
    fn contains(&self, id: ClassId) -> bool {
        let i = id.0 as usize;
        self.0.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }
}

/// Bit per workload kind; 0 in a rule means every kind.
fn workload_bit(w: WorkloadKind) -> u8 {
    match w {
        WorkloadKind::Game => 1,
        WorkloadKind::Inference => 2,
    }
}
const ALL_WORKLOADS: u8 = 1 | 2;

struct CompiledRule {
    name: RuleName,
    reason: Arc<str>,
    /// `None`: every class.
    classes: Option<ClassSet>,
    /// Bitmask of [`workload_bit`]s; `ALL_WORKLOADS` when the rule names none.
    workloads: u8,
    deny_client: Option<CountrySet>,
    deny_node: Option<CountrySet>,
    residency: Option<(CountrySet, CountrySet)>,
    /// `unknown_location = "deny"`: reasons for denying an unknown side; `None` for `allow`,
    /// under which unknown locations take no part in the rule.
    unknown_reasons: Option<BuiltinReasons>,
}

impl CompiledRule {
    #[inline]
    fn applies_to_class(&self, class: ClassId) -> bool {
        self.classes.as_ref().is_none_or(|s| s.contains(class))
    }
}

/// Which party a denial is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The client's location or address.
    Client,
    /// The node's location or address.
    Node,
    /// The combination (residency).
    Pair,
}

/// What a decision was based on. `Copy` and allocation-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Facts {
    pub client_country: Option<Country>,
    pub client_subdivision: Option<Subdivision>,
    /// Whether the client address carries one of the configured anonymous flags.
    pub client_anonymous: bool,
    pub node_country: Option<Country>,
    pub node_subdivision: Option<Subdivision>,
    /// Whether the node address carries one of the configured anonymous flags.
    pub node_anonymous: bool,
    pub class: ClassId,
    pub controlled: bool,
    /// `None` for onboarding, which is not about one workload.
    pub workload: Option<WorkloadKind>,
}

/// The outcome of a policy check. Every decision says what it was based on; a denial also
/// names the rule and gives the reason to show the denied party.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow {
        facts: Facts,
    },
    Deny {
        rule: RuleName,
        side: Side,
        reason: Arc<str>,
        facts: Facts,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The denying rule's name; `None` when allowed.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Decision::Allow { .. } => None,
            Decision::Deny { rule, .. } => Some(rule),
        }
    }

    /// The denial's reason; `None` when allowed.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Decision::Allow { .. } => None,
            Decision::Deny { reason, .. } => Some(reason),
        }
    }

    /// The denied side; `None` when allowed.
    pub fn side(&self) -> Option<Side> {
        match self {
            Decision::Allow { .. } => None,
            Decision::Deny { side, .. } => Some(*side),
        }
    }

    pub fn facts(&self) -> &Facts {
        match self {
            Decision::Allow { facts } | Decision::Deny { facts, .. } => facts,
        }
    }
}

impl Serialize for Decision {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("allowed", &self.is_allowed())?;
        m.serialize_entry("rule", &self.rule())?;
        m.serialize_entry("side", &self.side())?;
        m.serialize_entry("reason", &self.reason())?;
        m.serialize_entry("facts", self.facts())?;
        m.end()
    }
}

/// Side-specific reasons for the two built-in checks, prepared once.
struct BuiltinReasons {
    client: Arc<str>,
    node: Arc<str>,
}

impl BuiltinReasons {
    fn get(&self, side: Side) -> Arc<str> {
        match side {
            Side::Node => self.node.clone(),
            Side::Client | Side::Pair => self.client.clone(),
        }
    }
}

/// A compiled `[geofence]` section. Pure: no I/O, no locks; share it behind an `Arc`
/// (and swap it with `ArcSwap` on config reload).
pub struct Policy {
    rules: Vec<CompiledRule>,
    classes: HashMap<Box<str>, ClassId>,
    class_names: Vec<Arc<str>>,
    controlled: ClassSet,
    unknown_controlled: UnknownPolicy,
    unknown_uncontrolled: UnknownPolicy,
    anonymous: AnonymousPolicy,
    anonymous_mask: u8,
    unknown_rule: RuleName,
    anonymous_rule: RuleName,
    unknown_reasons: BuiltinReasons,
    anonymous_reasons: BuiltinReasons,
    sets: BTreeMap<String, CountrySet>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field(
                "rules",
                &self.rules.iter().map(|r| &*r.name).collect::<Vec<_>>(),
            )
            .field("classes", &self.class_names)
            .finish_non_exhaustive()
    }
}

/// Lower case without spaces, hyphens and underscores, as class names compare.
fn normalize_class(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ' ' | '-' | '_'))
        .flat_map(char::to_lowercase)
        .collect()
}

impl Policy {
    /// Compiles a `[geofence]` section. Fails on unknown or cyclic set references, malformed
    /// members, unknown class sets, duplicate or reserved rule names, and half-specified
    /// residency rules.
    pub fn compile(config: &GeofenceConfig) -> Result<Policy, PolicyError> {
        let mut classes: HashMap<Box<str>, ClassId> = HashMap::new();
        let mut class_names: Vec<Arc<str>> = Vec::new();
        let mut intern = |raw: &str, context: &str| -> Result<ClassId, PolicyError> {
            let norm = normalize_class(raw);
            if norm.is_empty() {
                return Err(PolicyError::BadClass {
                    context: context.to_string(),
                    class: raw.to_string(),
                });
            }
            if let Some(id) = classes.get(norm.as_str()) {
                return Ok(*id);
            }
            // u16::MAX is ClassId::OTHER.
            let max = u16::MAX as usize;
            if class_names.len() >= max {
                return Err(PolicyError::TooManyClasses { max });
            }
            let id = ClassId(class_names.len() as u16);
            class_names.push(Arc::from(norm.as_str()));
            classes.insert(norm.into_boxed_str(), id);
            Ok(id)
        };

        let mut controlled = ClassSet::default();
        for c in &config.controlled_gpu_classes {
            controlled.insert(intern(c, "controlled_gpu_classes")?);
        }

        let mut expander = SetExpander::new(&config.country_sets);
        let mut sets = BTreeMap::new();
        for name in config.country_sets.keys() {
            let m = expander.set(name, "country_sets")?;
            sets.insert(name.clone(), CountrySet::from_members(&m));
        }

        let mut rules = Vec::new();
        let mut names = BTreeSet::new();
        for rule in &config.rules {
            if rule.name.trim().is_empty() {
                return Err(PolicyError::BadRuleName {
                    rule: rule.name.clone(),
                    problem: "empty",
                });
            }
            if rule.name == UNKNOWN_LOCATION_RULE || rule.name == ANONYMOUS_IP_RULE {
                return Err(PolicyError::BadRuleName {
                    rule: rule.name.clone(),
                    problem: "reserved for the built-in checks",
                });
            }
            if !names.insert(rule.name.clone()) {
                return Err(PolicyError::BadRuleName {
                    rule: rule.name.clone(),
                    problem: "used by more than one rule",
                });
            }
            // Disabled rules are still compiled, so a mistake in one is caught before it is
            // switched on; they are just not kept for evaluation.
            let ctx = |field: &str| format!("rule {:?} {field}", rule.name);
            let classes_set = if rule.gpu_classes.is_empty() {
                None
            } else {
                let mut set = ClassSet::default();
                for c in &rule.gpu_classes {
                    match c.trim().strip_prefix('@') {
                        Some("controlled") => {
                            for cc in &config.controlled_gpu_classes {
                                set.insert(intern(cc, "controlled_gpu_classes")?);
                            }
                        }
                        Some(other) => {
                            return Err(PolicyError::UnknownClassSet {
                                rule: rule.name.clone(),
                                name: other.to_string(),
                            })
                        }
                        None => set.insert(intern(c, &ctx("gpu_classes"))?),
                    }
                }
                Some(set)
            };
            let mut compile_list = |list: &[String], field: &str| -> Result<_, PolicyError> {
                if list.is_empty() {
                    return Ok(None);
                }
                let m = expander.list(list, &ctx(field))?;
                Ok(Some(CountrySet::from_members(&m)))
            };
            let deny_client = compile_list(&rule.deny_client_countries, "deny_client_countries")?;
            let deny_node = compile_list(&rule.deny_node_countries, "deny_node_countries")?;
            let res_client = compile_list(
                &rule.residency_client_countries,
                "residency_client_countries",
            )?;
            let res_node =
                compile_list(&rule.residency_node_countries, "residency_node_countries")?;
            let residency = match (res_client, res_node) {
                (None, None) => None,
                (Some(c), Some(n)) => Some((c, n)),
                _ => {
                    return Err(PolicyError::HalfResidency {
                        rule: rule.name.clone(),
                    })
                }
            };
            let workloads = rule
                .workloads
                .iter()
                .fold(0u8, |acc, w| acc | workload_bit(*w));
            let reason: Arc<str> = match &rule.reason {
                Some(r) if !r.trim().is_empty() => Arc::from(r.as_str()),
                _ => Arc::from(format!("denied by geofence rule {:?}", rule.name)),
            };
            let unknown_reasons = (rule.unknown_location == UnknownPolicy::Deny).then(|| {
                let text = |who: &str| {
                    Arc::from(format!(
                        "the {who}'s location could not be determined, and geofence rule {:?} \
                         denies unknown locations",
                        rule.name
                    ))
                };
                BuiltinReasons {
                    client: text("client"),
                    node: text("node"),
                }
            });
            if rule.enabled {
                rules.push(CompiledRule {
                    name: Arc::from(rule.name.as_str()),
                    reason,
                    classes: classes_set,
                    workloads: if workloads == 0 {
                        ALL_WORKLOADS
                    } else {
                        workloads
                    },
                    deny_client,
                    deny_node,
                    residency,
                    unknown_reasons,
                });
            }
        }

        let anonymous_mask = config
            .anonymous_flags
            .iter()
            .fold(0u8, |acc, f| acc | AnonymousFlags::bit(*f));

        Ok(Policy {
            rules,
            classes,
            class_names,
            controlled,
            unknown_controlled: config.unknown_location_controlled,
            unknown_uncontrolled: config.unknown_location_uncontrolled,
            anonymous: config.anonymous,
            anonymous_mask,
            unknown_rule: Arc::from(UNKNOWN_LOCATION_RULE),
            anonymous_rule: Arc::from(ANONYMOUS_IP_RULE),
            unknown_reasons: BuiltinReasons {
                client: Arc::from("the client's location could not be determined"),
                node: Arc::from("the node's location could not be determined"),
            },
            anonymous_reasons: BuiltinReasons {
                client: Arc::from(
                    "the client's address is an anonymising service (VPN, proxy, Tor or hosting)",
                ),
                node: Arc::from(
                    "the node's address is an anonymising service (VPN, proxy, Tor or hosting)",
                ),
            },
            sets,
        })
    }

    /// The id of a GPU class (see the module docs on normalisation); [`ClassId::OTHER`] for a
    /// class the configuration does not name.
    pub fn class_id(&self, class: &str) -> ClassId {
        // Fast path: most callers pass names already in normal form; avoid allocating then.
        if let Some(id) = self.classes.get(class) {
            return *id;
        }
        self.classes
            .get(normalize_class(class).as_str())
            .copied()
            .unwrap_or(ClassId::OTHER)
    }

    /// The normalised name of a class id, or `"other"` for [`ClassId::OTHER`].
    pub fn class_name(&self, id: ClassId) -> &str {
        self.class_names.get(id.0 as usize).map_or("other", |s| s)
    }

    /// Whether a class is subject to export control (`controlled_gpu_classes`).
    #[inline]
    pub fn is_controlled(&self, class: ClassId) -> bool {
        self.controlled.contains(class)
    }

    /// The enabled rules' names, in evaluation order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| &*r.name)
    }

    /// A named country set after expansion, for display.
    pub fn country_set(&self, name: &str) -> Option<&CountrySet> {
        self.sets.get(name)
    }

    /// May this node (its location looked up from the address it connects from) serve this
    /// client with this class and workload?
    #[inline]
    pub fn check_serve(
        &self,
        client: &Location,
        node: &Location,
        class: ClassId,
        workload: WorkloadKind,
    ) -> Decision {
        self.evaluate(Some(client), Some(node), class, Some(workload))
    }

    /// May a node here be onboarded with this class? See the module docs.
    pub fn check_onboard(&self, node: &Location, class: ClassId) -> Decision {
        self.evaluate(None, Some(node), class, None)
    }

    /// May a client here use this class for this workload at all, wherever the node is?
    /// Client-side rules only; see the module docs.
    pub fn check_client(
        &self,
        client: &Location,
        class: ClassId,
        workload: WorkloadKind,
    ) -> Decision {
        self.evaluate(Some(client), None, class, Some(workload))
    }

    fn evaluate(
        &self,
        client: Option<&Location>,
        node: Option<&Location>,
        class: ClassId,
        workload: Option<WorkloadKind>,
    ) -> Decision {
        let controlled = self.is_controlled(class);
        let anon =
            |l: Option<&Location>| l.is_some_and(|l| l.anonymous.bits() & self.anonymous_mask != 0);
        let facts = Facts {
            client_country: client.and_then(|l| l.country),
            client_subdivision: client.and_then(|l| l.subdivision),
            client_anonymous: anon(client),
            node_country: node.and_then(|l| l.country),
            node_subdivision: node.and_then(|l| l.subdivision),
            node_anonymous: anon(node),
            class,
            controlled,
            workload,
        };
        // Only known locations take part in country rules, except in rules that deny unknown
        // locations (see the module docs).
        let known_client = client.filter(|l| !l.is_unknown());
        let known_node = node.filter(|l| !l.is_unknown());
        // Onboarding is not for one workload: only rules covering every kind refuse a node.
        let wbits = workload.map_or(ALL_WORKLOADS, workload_bit);

        for rule in &self.rules {
            if rule.workloads & wbits != wbits || !rule.applies_to_class(class) {
                continue;
            }
            let deny = |side, reason: &Arc<str>| Decision::Deny {
                rule: rule.name.clone(),
                side,
                reason: reason.clone(),
                facts,
            };
            let (c, n) = match &rule.unknown_reasons {
                None => (known_client, known_node),
                Some(_) => (client, node),
            };
            // A location reaching here unknown belongs to a rule that assumes the worst.
            let unknown_deny = |side| {
                let reasons = rule.unknown_reasons.as_ref();
                deny(side, &reasons.map_or(rule.reason.clone(), |r| r.get(side)))
            };
            if let (Some(set), Some(c)) = (&rule.deny_client, c) {
                if c.is_unknown() {
                    return unknown_deny(Side::Client);
                }
                if set.contains(c) {
                    return deny(Side::Client, &rule.reason);
                }
            }
            if let (Some(set), Some(n)) = (&rule.deny_node, n) {
                if n.is_unknown() {
                    return unknown_deny(Side::Node);
                }
                if set.contains(n) {
                    return deny(Side::Node, &rule.reason);
                }
            }
            if let (Some((cs, ns)), Some(c), Some(n)) = (&rule.residency, c, n) {
                let client_in = c.is_unknown() || cs.contains(c);
                let node_in = !n.is_unknown() && ns.contains(n);
                if client_in && !node_in {
                    return match (c.is_unknown(), n.is_unknown()) {
                        (true, _) => unknown_deny(Side::Client),
                        (false, true) => unknown_deny(Side::Node),
                        (false, false) => deny(Side::Pair, &rule.reason),
                    };
                }
            }
        }

        let anonymous_denies = match self.anonymous {
            AnonymousPolicy::Allow => false,
            AnonymousPolicy::DenyControlled => controlled,
            AnonymousPolicy::Deny => true,
        };
        if anonymous_denies {
            for (side, flagged) in [
                (Side::Client, facts.client_anonymous),
                (Side::Node, facts.node_anonymous),
            ] {
                if flagged {
                    return Decision::Deny {
                        rule: self.anonymous_rule.clone(),
                        side,
                        reason: self.anonymous_reasons.get(side),
                        facts,
                    };
                }
            }
        }

        let unknown_policy = if controlled {
            self.unknown_controlled
        } else {
            self.unknown_uncontrolled
        };
        if unknown_policy == UnknownPolicy::Deny {
            for (side, loc) in [(Side::Client, client), (Side::Node, node)] {
                if loc.is_some_and(Location::is_unknown) {
                    return Decision::Deny {
                        rule: self.unknown_rule.clone(),
                        side,
                        reason: self.unknown_reasons.get(side),
                        facts,
                    };
                }
            }
        }
        Decision::Allow { facts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearpath_config::{AnonymousFlag, GeofenceRule};

    fn loc(cc: &str) -> Location {
        Location::from_country(Country::parse(cc).unwrap())
    }

    fn sets(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn rule(name: &str) -> GeofenceRule {
        GeofenceRule {
            name: name.into(),
            enabled: true,
            reason: None,
            gpu_classes: vec![],
            workloads: vec![],
            deny_client_countries: vec![],
            deny_node_countries: vec![],
            residency_client_countries: vec![],
            residency_node_countries: vec![],
            unknown_location: UnknownPolicy::Allow,
        }
    }

    #[test]
    fn nested_sets_expand_and_cycles_fail() {
        let mut cfg = GeofenceConfig {
            country_sets: sets(&[("a", &["@b", "FR"]), ("b", &["DE", "UA-43"])]),
            rules: vec![],
            ..GeofenceConfig::default()
        };
        let p = Policy::compile(&cfg).unwrap();
        let a = p.country_set("a").unwrap();
        assert_eq!(
            a.countries().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["DE", "FR"]
        );
        assert_eq!(a.subdivisions()[0].as_str(), "UA-43");

        cfg.country_sets = sets(&[("a", &["@b"]), ("b", &["@c"]), ("c", &["@a"])]);
        match Policy::compile(&cfg) {
            Err(PolicyError::SetCycle { cycle }) => assert_eq!(cycle, "@a -> @b -> @c -> @a"),
            other => panic!("{other:?}"),
        }
        cfg.country_sets = sets(&[("a", &["@missing"])]);
        assert!(matches!(
            Policy::compile(&cfg),
            Err(PolicyError::UnknownSet { name, .. }) if name == "missing"
        ));
        cfg.country_sets = sets(&[("a", &["France"])]);
        assert!(matches!(
            Policy::compile(&cfg),
            Err(PolicyError::BadMember { member, .. }) if member == "France"
        ));
    }

    #[test]
    fn rule_errors() {
        let base = GeofenceConfig::default();
        let with = |r: GeofenceRule| GeofenceConfig {
            rules: vec![r],
            ..base.clone()
        };
        let mut r = rule("x");
        r.gpu_classes = vec!["@gaming".into()];
        assert!(matches!(
            Policy::compile(&with(r)),
            Err(PolicyError::UnknownClassSet { .. })
        ));
        let mut r = rule("x");
        r.residency_client_countries = vec!["@eu".into()];
        assert!(matches!(
            Policy::compile(&with(r)),
            Err(PolicyError::HalfResidency { .. })
        ));
        assert!(matches!(
            Policy::compile(&with(rule("unknown-location"))),
            Err(PolicyError::BadRuleName { .. })
        ));
        let dup = GeofenceConfig {
            rules: vec![rule("x"), rule("x")],
            ..base.clone()
        };
        assert!(matches!(
            Policy::compile(&dup),
            Err(PolicyError::BadRuleName { .. })
        ));
        // A disabled rule with a mistake still fails: it would fail when switched on.
        let mut r = rule("x");
        r.enabled = false;
        r.deny_client_countries = vec!["@nope".into()];
        assert!(Policy::compile(&with(r)).is_err());
    }

    #[test]
    fn class_ids_normalise_and_unknown_is_other() {
        let p = Policy::compile(&GeofenceConfig::default()).unwrap();
        let h100 = p.class_id("h100");
        assert_eq!(p.class_id("H100"), h100);
        assert_eq!(p.class_id("RTX 4090"), p.class_id("rtx4090"));
        assert_eq!(p.class_id("rtx-4090"), p.class_id("rtx4090"));
        assert!(p.is_controlled(p.class_id("RTX 4090")));
        assert_ne!(p.class_id("rtx4090d"), p.class_id("rtx4090"));
        assert_eq!(p.class_id("rtx3080"), ClassId::OTHER);
        assert!(!p.is_controlled(ClassId::OTHER));
        assert_eq!(p.class_name(h100), "h100");
        assert_eq!(p.class_name(ClassId::OTHER), "other");
    }

    #[test]
    fn rule_limited_to_a_named_class_matches_only_it() {
        let mut r = rule("no-rtx3080-in-fr");
        r.gpu_classes = vec!["RTX 3080".into()];
        r.deny_client_countries = vec!["FR".into()];
        let cfg = GeofenceConfig {
            rules: vec![r],
            ..GeofenceConfig::default()
        };
        let p = Policy::compile(&cfg).unwrap();
        let rtx = p.class_id("rtx3080");
        assert!(!rtx.is_other());
        assert!(!p.is_controlled(rtx));
        let d = p.check_serve(&loc("FR"), &loc("DE"), rtx, WorkloadKind::Game);
        assert_eq!(d.rule(), Some("no-rtx3080-in-fr"));
        assert_eq!(d.side(), Some(Side::Client));
        assert_eq!(
            d.reason(),
            Some("denied by geofence rule \"no-rtx3080-in-fr\"")
        );
        let cpu = p.class_id("cpu");
        assert!(p
            .check_serve(&loc("FR"), &loc("DE"), cpu, WorkloadKind::Game)
            .is_allowed());
    }

    #[test]
    fn anonymous_mask_follows_configured_flags() {
        let cfg = GeofenceConfig {
            anonymous: AnonymousPolicy::Deny,
            anonymous_flags: vec![AnonymousFlag::TorExitNode],
            ..GeofenceConfig::default()
        };
        let p = Policy::compile(&cfg).unwrap();
        let cpu = p.class_id("cpu");
        let mut client = loc("DE");
        client.anonymous.hosting_provider = true;
        let d = p.check_serve(&client, &loc("DE"), cpu, WorkloadKind::Inference);
        assert!(d.is_allowed(), "hosting is not a configured flag: {d:?}");
        assert!(!d.facts().client_anonymous);
        client.anonymous.tor_exit_node = true;
        let d = p.check_serve(&client, &loc("DE"), cpu, WorkloadKind::Inference);
        assert_eq!(d.rule(), Some(ANONYMOUS_IP_RULE));
        assert_eq!(d.side(), Some(Side::Client));
        assert!(d.facts().client_anonymous);
    }

    #[test]
    fn decision_serializes_with_rule_and_facts() {
        let p = Policy::compile(&GeofenceConfig::default()).unwrap();
        let d = p.check_serve(
            &loc("KP"),
            &loc("US"),
            p.class_id("cpu"),
            WorkloadKind::Game,
        );
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["allowed"], false);
        assert_eq!(v["rule"], "sanctions");
        assert_eq!(v["side"], "client");
        assert_eq!(v["facts"]["client_country"], "KP");
        assert_eq!(v["facts"]["node_country"], "US");
        assert_eq!(v["facts"]["workload"], "game");
    }

    #[test]
    fn a_rule_denying_unknown_locations_assumes_the_worst() {
        let mut r = rule("eu-only");
        r.residency_client_countries = vec!["FR".into()];
        r.residency_node_countries = vec!["FR".into()];
        r.unknown_location = UnknownPolicy::Deny;
        let cfg = GeofenceConfig {
            rules: vec![r],
            ..GeofenceConfig::default()
        };
        let p = Policy::compile(&cfg).unwrap();
        let cpu = p.class_id("cpu");
        let unknown = Location::UNKNOWN;
        let serve = |c: &Location, n: &Location| p.check_serve(c, n, cpu, WorkloadKind::Game);
        // An unknown client might be in FR: only an FR node may serve it.
        assert_eq!(serve(&unknown, &loc("DE")).side(), Some(Side::Client));
        assert!(serve(&unknown, &loc("FR")).is_allowed());
        // An unknown node might be outside FR: it may not serve an FR client.
        let d = serve(&loc("FR"), &unknown);
        assert_eq!((d.rule(), d.side()), (Some("eu-only"), Some(Side::Node)));
        assert!(d.reason().unwrap().contains("could not be determined"));
        // Clients outside the residency list are not the rule's business.
        assert!(serve(&loc("DE"), &unknown).is_allowed());
        // Known pairs are judged as before.
        assert_eq!(serve(&loc("FR"), &loc("DE")).side(), Some(Side::Pair));
        assert_eq!(
            serve(&loc("FR"), &loc("DE")).reason(),
            Some("denied by geofence rule \"eu-only\"")
        );
        // Residency does not apply at onboarding, and a client-only check has no node.
        assert!(p.check_onboard(&unknown, cpu).is_allowed());
        assert!(p
            .check_client(&unknown, cpu, WorkloadKind::Game)
            .is_allowed());
    }
}
