//! [`GeoDb`]: MaxMind DB lookups with static overrides, an optional Anonymous-IP database and
//! hot reload.
//!
//! # Replacing database files
//!
//! Configured database files are memory-mapped. Replace them **by rename**: write the new file
//! next to the old one (same file system), then `rename(2)` it over the configured path (`mv
//! new.mmdb GeoIP2-City.mmdb`). The old file's inode stays alive, and mapped, until the last
//! lookup that uses it has finished, so lookups in flight never see a half-written file.
//! Overwriting or truncating the mapped file *in place* (`cp new.mmdb GeoIP2-City.mmdb`,
//! `> file`, an editor saving in place) is unsafe: readers of the mapping can see torn data or
//! receive `SIGBUS`. Neither this crate nor any other mmap reader can guard against that.
//! Symlink swaps (`ln -sfn`) work as well, since the path is opened afresh on every reload.
//!
//! [`GeoDb::reload_if_changed`] notices a replacement by comparing the file's device, inode,
//! length and modification time with those of the open file.

use crate::country::{Continent, Country, Subdivision};
use crate::embedding::{locatable, Nat64PrefixError, Nat64Prefixes};
use crate::location::{AnonymousFlags, Coords, Location, Source};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use maxminddb::{MaxMindDbError, Mmap, Reader, WithinOptions};
use nearpath_config::GeoConfig;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The database compiled into the binary: NRO WHOIS/ASN country data (flat `country_code`
/// schema, CC BY 4.0 by the Number Resource Organization; see `geo/data/README.md`).
static EMBEDDED_DB: &[u8] = include_bytes!("../data/geo-whois-asn-country.mmdb");

/// The bytes of the embedded database, e.g. for a benchmark that compares with a bare reader.
pub fn embedded_database_bytes() -> &'static [u8] {
    EMBEDDED_DB
}

/// The name used in errors and [`DbInfo::source`] for the embedded database.
pub const EMBEDDED_NAME: &str = "embedded";

/// Errors opening or reloading a database. Every variant names the file; all of them are the
/// operator's to fix (configuration or the file itself), never a client's.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    /// The file could not be opened, inspected or mapped.
    #[error("GeoIP database {}: cannot read it: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a valid MaxMind DB (corrupt, truncated, or another format).
    #[error("GeoIP database {}: not a valid MaxMind DB file (corrupt or truncated?): {source}", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: MaxMindDbError,
    },
    /// The file is a valid MaxMind DB, but of a kind that cannot serve in this role (an ASN
    /// database configured as the location database, a City database as Anonymous-IP).
    #[error("GeoIP database {}: database type {database_type:?} {problem}", path.display())]
    WrongType {
        path: PathBuf,
        database_type: String,
        problem: &'static str,
    },
    /// A `[[geo.overrides]]` entry is malformed.
    #[error("geo override {cidr}: {problem}")]
    BadOverride { cidr: IpNet, problem: String },
    /// A `geo.nat64_prefixes` entry is malformed.
    #[error("geo.nat64_prefixes: {0}")]
    BadNat64Prefix(#[from] Nat64PrefixError),
}

impl GeoError {
    /// Whether trying the same operation again later may succeed without anyone changing the
    /// configuration: true for a file that is missing or unreadable for a transient reason
    /// (it may be in the middle of being replaced); false for a corrupt file or a wrong
    /// database type, which stay wrong until the file is replaced.
    pub fn retry_may_help(&self) -> bool {
        match self {
            GeoError::Io { source, .. } => !matches!(
                source.kind(),
                io::ErrorKind::PermissionDenied
                    | io::ErrorKind::InvalidInput
                    | io::ErrorKind::IsADirectory
            ),
            GeoError::Corrupt { .. }
            | GeoError::WrongType { .. }
            | GeoError::BadOverride { .. }
            | GeoError::BadNat64Prefix(_) => false,
        }
    }

    /// The file the error is about, if any (`embedded` for the built-in database).
    pub fn path(&self) -> Option<&Path> {
        match self {
            GeoError::Io { path, .. }
            | GeoError::Corrupt { path, .. }
            | GeoError::WrongType { path, .. } => Some(path),
            GeoError::BadOverride { .. } | GeoError::BadNat64Prefix(_) => None,
        }
    }
}

/// How the records of a location database are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schema {
    /// GeoIP2/GeoLite2 (and compatible, e.g. DB-IP) City, Country or Enterprise:
    /// `{"country":{"iso_code"},"subdivisions":[{"iso_code"}],"continent":{"code"},
    /// "location":{"latitude","longitude","accuracy_radius"}}`.
    GeoIp2,
    /// Flat records `{"country_code":"US"}`, optionally with `latitude`/`longitude` (the
    /// ip-location-db family, including the embedded database).
    Flat,
    /// GeoIP2 Anonymous-IP: `{"is_anonymous":true,...}`.
    AnonymousIp,
}

/// Which role a file is opened for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Location,
    Anonymous,
}

/// Database types that are valid MaxMind DBs but carry no location.
const NON_LOCATION_TYPES: &[&str] = &[
    "ASN",
    "ISP",
    "Domain",
    "Connection-Type",
    "Anonymous",
    "User-Connection-Type",
    "Static-IP-Score",
];

/// Chooses the record layout from the metadata `database_type`.
///
/// `GeoIP2-*`, `GeoLite2-*` and `DBIP-*` City/Country/Enterprise databases use the nested
/// GeoIP2 layout. Anything else is read as the flat `country_code` layout (the embedded
/// database's type is `"country ipvAll"`-like, from ip-location-db). Types known to carry no
/// location at all (ASN, ISP, Anonymous-IP, ...) are refused, so that a wrong file fails at load
/// rather than answering "unknown" for every address.
fn detect_schema(database_type: &str, role: Role) -> Result<Schema, &'static str> {
    let vendor_geoip2 = ["GeoIP2-", "GeoLite2-", "GeoIP-", "DBIP-", "dbip-"]
        .iter()
        .any(|p| database_type.starts_with(p));
    match role {
        Role::Anonymous => {
            if database_type.contains("Anonymous") {
                Ok(Schema::AnonymousIp)
            } else {
                Err("is not an Anonymous-IP database (expected e.g. GeoIP2-Anonymous-IP)")
            }
        }
        Role::Location => {
            if vendor_geoip2 && NON_LOCATION_TYPES.iter().any(|t| database_type.contains(t)) {
                return Err(
                    "carries no location; configure a City or Country database (or the flat country_code schema)",
                );
            }
            if vendor_geoip2
                || ["City", "Country", "Enterprise"]
                    .iter()
                    .any(|t| database_type.contains(t))
            {
                Ok(Schema::GeoIp2)
            } else {
                Ok(Schema::Flat)
            }
        }
    }
}

/// A reader over the embedded bytes or a file mapping. An enum of readers, rather than a reader
/// over an enum of byte sources, so that the choice is made once per lookup and not on every
/// search-tree node the reader visits.
enum AnyReader {
    Embedded(Reader<&'static [u8]>),
    Mapped(Reader<Mmap>),
}

impl AnyReader {
    fn metadata(&self) -> &maxminddb::Metadata {
        match self {
            AnyReader::Embedded(r) => r.metadata(),
            AnyReader::Mapped(r) => r.metadata(),
        }
    }
}

/// Identity of a file on disk, to notice replacement without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let (dev, ino) = (0, 0);
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            dev,
            ino,
        }
    }
}

/// One opened database.
struct Loaded {
    reader: AnyReader,
    schema: Schema,
    /// `None` for the embedded database.
    path: Option<PathBuf>,
    fingerprint: Option<Fingerprint>,
}

impl Loaded {
    fn embedded() -> Result<Self, GeoError> {
        let path = PathBuf::from(EMBEDDED_NAME);
        let reader = Reader::from_source(EMBEDDED_DB).map_err(|source| GeoError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let schema =
            detect_schema(&reader.metadata().database_type, Role::Location).map_err(|problem| {
                GeoError::WrongType {
                    path,
                    database_type: reader.metadata().database_type.clone(),
                    problem,
                }
            })?;
        Ok(Self {
            reader: AnyReader::Embedded(reader),
            schema,
            path: None,
            fingerprint: None,
        })
    }

    /// Opens, maps and checks a file: see [`check_records`].
    fn open(path: &Path, role: Role) -> Result<Self, GeoError> {
        let io_err = |source| GeoError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let corrupt = |source| GeoError::Corrupt {
            path: path.to_path_buf(),
            source,
        };
        if meta.len() == 0 {
            return Err(corrupt(MaxMindDbError::invalid_database(
                "the file is empty",
            )));
        }
        // SAFETY: the mapping is read-only and private to this process. The file must not be
        // modified in place while mapped (see the module docs: replace it by rename); a renamed
        // replacement leaves this inode, and so this mapping, intact.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let reader = Reader::from_source(mmap).map_err(corrupt)?;
        let database_type = &reader.metadata().database_type;
        let schema = detect_schema(database_type, role).map_err(|problem| GeoError::WrongType {
            path: path.to_path_buf(),
            database_type: database_type.clone(),
            problem,
        })?;
        check_records(&reader, schema).map_err(corrupt)?;
        Ok(Self {
            reader: AnyReader::Mapped(reader),
            schema,
            path: Some(path.to_path_buf()),
            fingerprint: Some(Fingerprint::of(&meta)),
        })
    }

    fn info(&self) -> DbInfo {
        let m = self.reader.metadata();
        DbInfo {
            source: match &self.path {
                Some(p) => p.display().to_string(),
                None => EMBEDDED_NAME.to_string(),
            },
            database_type: m.database_type.clone(),
            schema: self.schema,
            build_epoch: m.build_epoch,
            node_count: m.node_count,
            ip_version: m.ip_version,
            size_bytes: self.reader_len(),
        }
    }

    fn reader_len(&self) -> u64 {
        match &self.path {
            None => EMBEDDED_DB.len() as u64,
            Some(_) => self.fingerprint.map_or(0, |f| f.len),
        }
    }
}

/// Walks the whole search tree and decodes every distinct record once with the layout lookups
/// will use, so that a corrupt or truncated replacement, or a file whose records do not fit
/// the detected schema, is refused at load instead of answering garbage later. Costs time
/// proportional to the file (about a second for a large City database), off the lookup path.
///
/// `Reader::verify` is not used: it also insists on a non-empty metadata `description`, which
/// the ip-location-db databases (the embedded one among them) do not have.
fn check_records<S: AsRef<[u8]>>(reader: &Reader<S>, schema: Schema) -> Result<(), MaxMindDbError> {
    // A tree of N nodes has at most N + 1 leaves; more iterations mean a cycle.
    let max_networks = (reader.metadata().node_count as usize).saturating_mul(2) + 2;
    let mut seen = HashSet::new();
    for (i, result) in reader.networks(WithinOptions::default())?.enumerate() {
        if i > max_networks {
            return Err(MaxMindDbError::invalid_database(
                "the search tree has more networks than nodes allow (a cycle?)",
            ));
        }
        let res = result?;
        let Some(offset) = res.offset() else { continue };
        if !seen.insert(offset) {
            continue;
        }
        match schema {
            Schema::GeoIp2 => res.decode::<GeoIp2Rec<'_>>().map(drop)?,
            Schema::Flat => res.decode::<FlatRec<'_>>().map(drop)?,
            Schema::AnonymousIp => res.decode::<AnonRec>().map(drop)?,
        }
    }
    Ok(())
}

/// The set of databases lookups use; swapped as a whole on reload.
struct State {
    location: Arc<Loaded>,
    anonymous: Option<Arc<Loaded>>,
}

/// Facts about one open database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DbInfo {
    /// The file path, or `embedded`.
    pub source: String,
    /// Metadata `database_type`, e.g. `GeoIP2-City`.
    pub database_type: String,
    /// The record layout read from it.
    pub schema: Schema,
    /// Metadata `build_epoch` (seconds since the Unix epoch).
    pub build_epoch: u64,
    /// Metadata `node_count` of the search tree.
    pub node_count: u32,
    /// 4 or 6.
    pub ip_version: u16,
    /// Size of the file in bytes.
    pub size_bytes: u64,
}

/// What [`GeoDb::info`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GeoInfo {
    pub database: DbInfo,
    pub anonymous_ip_database: Option<DbInfo>,
    /// Number of static overrides.
    pub overrides: usize,
    /// Successful reloads that changed something, since start.
    pub reloads: u64,
    /// Records that failed to decode since start (each answered as unknown).
    pub decode_errors: u64,
}

/// What a reload did to one database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReloadOutcome {
    /// A new file is now in use.
    Reloaded { previous: DbInfo, current: DbInfo },
    /// The file has not changed since it was opened (only from `reload_if_changed`).
    Unchanged,
    /// The embedded database is in use; there is no file to reload.
    Embedded,
    /// No such database is configured.
    NotConfigured,
}

/// What [`GeoDb::reload`] and [`GeoDb::reload_if_changed`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    pub database: ReloadOutcome,
    pub anonymous_ip_database: ReloadOutcome,
}

impl ReloadReport {
    /// Whether any database was swapped.
    pub fn changed(&self) -> bool {
        matches!(self.database, ReloadOutcome::Reloaded { .. })
            || matches!(self.anonymous_ip_database, ReloadOutcome::Reloaded { .. })
    }
}

/// Static answers from `[[geo.overrides]]`, checked before the database.
struct Overrides {
    /// (network, mask, answer), longest prefix first.
    v4: Vec<(u32, u32, Location)>,
    v6: Vec<(u128, u128, Location)>,
}

impl Overrides {
    fn compile(config: &GeoConfig) -> Result<Self, GeoError> {
        let mut v4: Vec<(u8, u32, u32, Location)> = Vec::new();
        let mut v6: Vec<(u8, u128, u128, Location)> = Vec::new();
        for o in &config.overrides {
            let bad = |problem: String| GeoError::BadOverride {
                cidr: o.cidr,
                problem,
            };
            let country = Country::parse(&o.country).ok_or_else(|| {
                bad(format!(
                    "country {:?} is not an ISO 3166-1 alpha-2 code",
                    o.country
                ))
            })?;
            let subdivision = match &o.subdivision {
                None => None,
                Some(s) => {
                    let sub = Subdivision::parse(s).ok_or_else(|| {
                        bad(format!(
                            "subdivision {s:?} is not an ISO 3166-2 code like UA-43"
                        ))
                    })?;
                    if sub.country() != country {
                        return Err(bad(format!(
                            "subdivision {s:?} is not in country {}",
                            country
                        )));
                    }
                    Some(sub)
                }
            };
            let coords = match (o.lat, o.lon) {
                (None, None) => None,
                (Some(lat), Some(lon)) => {
                    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                        return Err(bad(format!("coordinates {lat},{lon} are out of range")));
                    }
                    Some(Coords { lat, lon })
                }
                _ => return Err(bad("give both lat and lon, or neither".to_string())),
            };
            let mut loc = Location {
                country: Some(country),
                subdivision,
                country_source: Source::Override,
                coords,
                coords_source: if coords.is_some() {
                    Source::Override
                } else {
                    Source::None
                },
                ..Location::UNKNOWN
            };
            loc.fill_from_country_table();
            match normalize_net(o.cidr) {
                IpNet::V4(n) => {
                    let len = n.prefix_len();
                    let mask = u32::from(n.netmask());
                    let net = u32::from(n.network());
                    if v4.iter().any(|e| e.0 == len && e.1 == net) {
                        return Err(bad("duplicate override for this prefix".to_string()));
                    }
                    v4.push((len, net, mask, loc));
                }
                IpNet::V6(n) => {
                    let len = n.prefix_len();
                    let mask = u128::from(n.netmask());
                    let net = u128::from(n.network());
                    if v6.iter().any(|e| e.0 == len && e.1 == net) {
                        return Err(bad("duplicate override for this prefix".to_string()));
                    }
                    v6.push((len, net, mask, loc));
                }
            }
        }
        // Longest prefix first, so the first match is the most specific one.
        v4.sort_by_key(|e| std::cmp::Reverse(e.0));
        v6.sort_by_key(|e| std::cmp::Reverse(e.0));
        Ok(Self {
            v4: v4.into_iter().map(|(_, n, m, l)| (n, m, l)).collect(),
            v6: v6.into_iter().map(|(_, n, m, l)| (n, m, l)).collect(),
        })
    }

    /// Longest-prefix match; a linear scan, since overrides are a handful of internal ranges.
    #[inline]
    fn find(&self, ip: IpAddr) -> Option<&Location> {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .find(|(net, mask, _)| a & mask == *net)
                    .map(|e| &e.2)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .iter()
                    .find(|(net, mask, _)| a & mask == *net)
                    .map(|e| &e.2)
            }
        }
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// An override written as an IPv4-mapped IPv6 prefix (`::ffff:10.0.0.0/104`) covers the same
/// addresses as the plain IPv4 prefix, because lookups canonicalise mapped addresses to IPv4.
fn normalize_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net {
        if n.prefix_len() >= 96 {
            if let Some(v4) = n.network().to_ipv4_mapped() {
                if let Ok(v4net) = ipnet::Ipv4Net::new(v4, n.prefix_len() - 96) {
                    return IpNet::V4(v4net);
                }
            }
        }
    }
    net.trunc()
}

// ---- record layouts: decode only the fields we use ----

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct ContinentRec<'a> {
    #[serde(borrow)]
    code: Option<&'a str>,
}

#[derive(Deserialize)]
struct LocationRec {
    latitude: Option<f64>,
    longitude: Option<f64>,
    accuracy_radius: Option<u16>,
}

/// `subdivisions` is ordered largest first; only the first matters here, the rest are skipped.
struct FirstSubdivision<'a>(Option<&'a str>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstSubdivision<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = FirstSubdivision<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of subdivisions")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first: Option<IsoCode<'a>> = seq.next_element()?;
                // The decoder must consume the whole list to stay in step with the record.
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstSubdivision(first.and_then(|s| s.iso_code)))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

#[derive(Deserialize)]
struct GeoIp2Rec<'a> {
    #[serde(borrow)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow)]
    continent: Option<ContinentRec<'a>>,
    location: Option<LocationRec>,
    #[serde(borrow)]
    subdivisions: Option<FirstSubdivision<'a>>,
}

/// A number stored as any MMDB numeric type (flat databases differ: float, double, int).
struct AnyNum(f64);

impl<'de> Deserialize<'de> for AnyNum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AnyNum;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<AnyNum, E> {
                Ok(AnyNum(v))
            }
            fn visit_f32<E: de::Error>(self, v: f32) -> Result<AnyNum, E> {
                Ok(AnyNum(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<AnyNum, E> {
                Ok(AnyNum(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<AnyNum, E> {
                Ok(AnyNum(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct FlatRec<'a> {
    #[serde(borrow)]
    country_code: Option<&'a str>,
    latitude: Option<AnyNum>,
    longitude: Option<AnyNum>,
}

#[derive(Deserialize)]
struct AnonRec {
    is_anonymous: Option<bool>,
    is_anonymous_vpn: Option<bool>,
    is_hosting_provider: Option<bool>,
    is_public_proxy: Option<bool>,
    is_residential_proxy: Option<bool>,
    is_tor_exit_node: Option<bool>,
}

fn valid_coords(lat: f64, lon: f64) -> Option<Coords> {
    ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon))
        .then_some(Coords { lat, lon })
}

/// GeoIP lookups: static overrides first, then the location database, plus Anonymous-IP flags.
///
/// Cheap to share (`Arc<GeoDb>`); lookups take no lock and never wait for a reload.
pub struct GeoDb {
    database_path: Option<PathBuf>,
    anonymous_path: Option<PathBuf>,
    overrides: Overrides,
    nat64: Nat64Prefixes,
    state: ArcSwap<State>,
    /// Serialises reloads so that two callers never open the same files twice at once.
    reload_lock: Mutex<()>,
    reloads: AtomicU64,
    decode_errors: AtomicU64,
}

impl fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoDb")
            .field("database", &self.database_path)
            .field("anonymous_ip_database", &self.anonymous_path)
            .field("overrides", &self.overrides.len())
            .finish_non_exhaustive()
    }
}

impl GeoDb {
    /// Opens the databases `config` names (the embedded one when `database` is unset) and
    /// compiles its overrides. Files are memory-mapped and fully verified.
    pub fn open(config: &GeoConfig) -> Result<Self, GeoError> {
        let overrides = Overrides::compile(config)?;
        let nat64 = Nat64Prefixes::new(&config.nat64_prefixes)?;
        let location = match &config.database {
            Some(p) => Loaded::open(p, Role::Location)?,
            None => Loaded::embedded()?,
        };
        let anonymous = match &config.anonymous_ip_database {
            Some(p) => Some(Arc::new(Loaded::open(p, Role::Anonymous)?)),
            None => None,
        };
        Ok(Self {
            database_path: config.database.clone(),
            anonymous_path: config.anonymous_ip_database.clone(),
            overrides,
            nat64,
            state: ArcSwap::from_pointee(State {
                location: Arc::new(location),
                anonymous,
            }),
            reload_lock: Mutex::new(()),
            reloads: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
        })
    }

    /// The embedded database alone: no overrides, no Anonymous-IP database.
    pub fn embedded() -> Result<Self, GeoError> {
        Self::open(&GeoConfig {
            database: None,
            anonymous_ip_database: None,
            overrides: Vec::new(),
            ..GeoConfig::default()
        })
    }

    /// Where `ip` is. Never fails: an address without a record (loopback, private ranges,
    /// unallocated space) or a record that cannot be decoded answers [`Location::UNKNOWN`]
    /// (country `None`, [`Source::None`]).
    ///
    /// An IPv6 address that embeds an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`,
    /// IPv4-compatible `::a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`, 6to4 `2002::/16`,
    /// Teredo `2001::/32`, NAT64 `64:ff9b::/96` and `geo.nat64_prefixes`) is located by that
    /// IPv4 address, in the overrides, the database and the Anonymous-IP database alike, and
    /// [`Location::embedded`] says so: see [`crate::embedding`]. This is the one place every
    /// caller (clients, nodes, `gateway geo lookup`) goes through.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Location {
        let (ip, embedded) = locatable(ip, &self.nat64);
        let state = self.state.load();
        let mut loc = match self.overrides.find(ip) {
            Some(o) => *o,
            None => self.lookup_location(&state.location, ip),
        };
        if let Some(anon) = &state.anonymous {
            loc.anonymous = self.lookup_anonymous(anon, ip);
        }
        loc.embedded = embedded;
        loc
    }

    fn note_decode_error(&self, ip: IpAddr, db: &Loaded, e: &MaxMindDbError) {
        let before = self.decode_errors.fetch_add(1, Ordering::Relaxed);
        let source = db.path.as_deref().unwrap_or(Path::new(EMBEDDED_NAME));
        // The first failure is worth a warning; a flood of them is counted in `info()`.
        if before == 0 {
            tracing::warn!(%ip, database = %source.display(), error = %e, "GeoIP record failed to decode; answering unknown");
        } else {
            tracing::debug!(%ip, database = %source.display(), error = %e, "GeoIP record failed to decode");
        }
    }

    #[inline]
    fn lookup_location(&self, db: &Loaded, ip: IpAddr) -> Location {
        match &db.reader {
            AnyReader::Embedded(r) => self.lookup_location_in(r, db, ip),
            AnyReader::Mapped(r) => self.lookup_location_in(r, db, ip),
        }
    }

    fn lookup_location_in<S: AsRef<[u8]>>(
        &self,
        reader: &Reader<S>,
        db: &Loaded,
        ip: IpAddr,
    ) -> Location {
        // An IPv6 address in an IPv4-only database is an error from the reader: unknown.
        let Ok(res) = reader.lookup(ip) else {
            return Location::UNKNOWN;
        };
        if !res.has_data() {
            return Location::UNKNOWN;
        }
        let mut loc = Location::UNKNOWN;
        match db.schema {
            Schema::GeoIp2 => match res.decode::<GeoIp2Rec<'_>>() {
                Ok(Some(rec)) => {
                    loc.country = rec
                        .country
                        .and_then(|c| c.iso_code)
                        .and_then(Country::parse);
                    if let (Some(country), Some(sub)) =
                        (loc.country, rec.subdivisions.and_then(|s| s.0))
                    {
                        loc.subdivision = Subdivision::from_parts(country, sub);
                    }
                    loc.continent = rec
                        .continent
                        .and_then(|c| c.code)
                        .and_then(Continent::parse);
                    if let Some(l) = rec.location {
                        if let (Some(lat), Some(lon)) = (l.latitude, l.longitude) {
                            loc.coords = valid_coords(lat, lon);
                            if loc.coords.is_some() {
                                loc.coords_source = Source::Database;
                                loc.accuracy_km = l.accuracy_radius;
                            }
                        }
                    }
                }
                Ok(None) => return Location::UNKNOWN,
                Err(e) => {
                    self.note_decode_error(ip, db, &e);
                    return Location::UNKNOWN;
                }
            },
            Schema::Flat | Schema::AnonymousIp => match res.decode::<FlatRec<'_>>() {
                Ok(Some(rec)) => {
                    loc.country = rec.country_code.and_then(Country::parse);
                    if let (Some(lat), Some(lon)) = (rec.latitude, rec.longitude) {
                        loc.coords = valid_coords(lat.0, lon.0);
                        if loc.coords.is_some() {
                            loc.coords_source = Source::Database;
                        }
                    }
                }
                Ok(None) => return Location::UNKNOWN,
                Err(e) => {
                    self.note_decode_error(ip, db, &e);
                    return Location::UNKNOWN;
                }
            },
        }
        if loc.country.is_some() {
            loc.country_source = Source::Database;
        }
        loc.fill_from_country_table();
        loc
    }

    fn lookup_anonymous(&self, db: &Loaded, ip: IpAddr) -> AnonymousFlags {
        match &db.reader {
            AnyReader::Embedded(r) => self.lookup_anonymous_in(r, db, ip),
            AnyReader::Mapped(r) => self.lookup_anonymous_in(r, db, ip),
        }
    }

    fn lookup_anonymous_in<S: AsRef<[u8]>>(
        &self,
        reader: &Reader<S>,
        db: &Loaded,
        ip: IpAddr,
    ) -> AnonymousFlags {
        let Ok(res) = reader.lookup(ip) else {
            return AnonymousFlags::default();
        };
        match res.decode::<AnonRec>() {
            Ok(Some(r)) => AnonymousFlags {
                anonymous: r.is_anonymous.unwrap_or(false),
                anonymous_vpn: r.is_anonymous_vpn.unwrap_or(false),
                hosting_provider: r.is_hosting_provider.unwrap_or(false),
                public_proxy: r.is_public_proxy.unwrap_or(false),
                residential_proxy: r.is_residential_proxy.unwrap_or(false),
                tor_exit_node: r.is_tor_exit_node.unwrap_or(false),
            },
            Ok(None) => AnonymousFlags::default(),
            Err(e) => {
                self.note_decode_error(ip, db, &e);
                AnonymousFlags::default()
            }
        }
    }

    /// Database type, build time, size and source of what is in use now.
    pub fn info(&self) -> GeoInfo {
        let state = self.state.load();
        GeoInfo {
            database: state.location.info(),
            anonymous_ip_database: state.anonymous.as_ref().map(|a| a.info()),
            overrides: self.overrides.len(),
            reloads: self.reloads.load(Ordering::Relaxed),
            decode_errors: self.decode_errors.load(Ordering::Relaxed),
        }
    }

    /// Re-opens every configured database file and swaps them in atomically. Lookups in flight
    /// keep using the old databases until they finish; none of them blocks or fails. If any
    /// file cannot be opened or fails verification, nothing is swapped and the error names it:
    /// the old databases stay in use.
    pub fn reload(&self) -> Result<ReloadReport, GeoError> {
        self.reload_inner(false)
    }

    /// Like [`GeoDb::reload`], but opens only files whose device, inode, length or
    /// modification time differ from those of the open file; `Unchanged` otherwise. Meant to
    /// be called every `reload_check_interval_s`.
    pub fn reload_if_changed(&self) -> Result<ReloadReport, GeoError> {
        self.reload_inner(true)
    }

    fn reload_inner(&self, only_if_changed: bool) -> Result<ReloadReport, GeoError> {
        // A poisoned lock only means another reload panicked; the state it guards is the
        // ArcSwap, which is always consistent, so carry on.
        let _guard = self
            .reload_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.state.load_full();

        let location = match &self.database_path {
            None => (current.location.clone(), ReloadOutcome::Embedded),
            Some(path) => Self::reopen(path, Role::Location, &current.location, only_if_changed)?,
        };
        let anonymous = match (&self.anonymous_path, &current.anonymous) {
            (Some(path), Some(old)) => {
                let (new, outcome) = Self::reopen(path, Role::Anonymous, old, only_if_changed)?;
                (Some(new), outcome)
            }
            // Configured paths never change after open, so this pair cannot occur; keep the
            // current state rather than panic.
            (Some(_), None) | (None, _) => {
                (current.anonymous.clone(), ReloadOutcome::NotConfigured)
            }
        };
        let report = ReloadReport {
            database: location.1,
            anonymous_ip_database: anonymous.1,
        };
        if report.changed() {
            self.state.store(Arc::new(State {
                location: location.0,
                anonymous: anonymous.0,
            }));
            self.reloads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(report = ?report, "GeoIP databases reloaded");
        }
        Ok(report)
    }

    fn reopen(
        path: &Path,
        role: Role,
        old: &Arc<Loaded>,
        only_if_changed: bool,
    ) -> Result<(Arc<Loaded>, ReloadOutcome), GeoError> {
        if only_if_changed {
            let meta = std::fs::metadata(path).map_err(|source| GeoError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            if Some(Fingerprint::of(&meta)) == old.fingerprint {
                return Ok((old.clone(), ReloadOutcome::Unchanged));
            }
        }
        let new = Arc::new(Loaded::open(path, role)?);
        let outcome = ReloadOutcome::Reloaded {
            previous: old.info(),
            current: new.info(),
        };
        Ok((new, outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_detection() {
        let loc = |t| detect_schema(t, Role::Location);
        assert_eq!(loc("GeoIP2-City"), Ok(Schema::GeoIp2));
        assert_eq!(loc("GeoLite2-Country"), Ok(Schema::GeoIp2));
        assert_eq!(loc("GeoIP2-Enterprise"), Ok(Schema::GeoIp2));
        assert_eq!(loc("DBIP-City-Lite"), Ok(Schema::GeoIp2));
        assert_eq!(loc("country ipvAll"), Ok(Schema::Flat));
        assert_eq!(loc("iptoasn-country"), Ok(Schema::Flat));
        assert!(loc("GeoLite2-ASN").is_err());
        assert!(loc("GeoIP2-Anonymous-IP").is_err());
        assert_eq!(
            detect_schema("GeoIP2-Anonymous-IP", Role::Anonymous),
            Ok(Schema::AnonymousIp)
        );
        assert!(detect_schema("GeoIP2-City", Role::Anonymous).is_err());
    }

    #[test]
    fn mapped_override_prefix_becomes_ipv4() {
        let n: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(normalize_net(n), "10.0.0.0/8".parse::<IpNet>().unwrap());
        let n: IpNet = "2001:db8::1/32".parse().unwrap();
        assert_eq!(normalize_net(n), "2001:db8::/32".parse::<IpNet>().unwrap());
    }

    #[test]
    fn embedded_metadata() {
        let db = GeoDb::embedded().unwrap();
        let info = db.info();
        eprintln!("{info:?}");
        assert_eq!(info.database.source, EMBEDDED_NAME);
        assert_eq!(info.database.schema, Schema::Flat);
        assert!(info.database.node_count > 100_000);
        let t = std::time::Instant::now();
        let l = Loaded::embedded().unwrap();
        let AnyReader::Embedded(r) = &l.reader else {
            panic!("not embedded")
        };
        check_records(r, l.schema).unwrap();
        eprintln!("check embedded: {:?}", t.elapsed());
    }
}
