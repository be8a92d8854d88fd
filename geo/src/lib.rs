//! GeoIP lookups (MaxMind DB) and the geofence policy engine.
//!
//! - [`GeoDb`] answers [`Location`]s: static overrides first, then a GeoIP2/GeoLite2 City or
//!   Country database, a flat `{"country_code"}` database, or the embedded NRO WHOIS country
//!   database; plus Anonymous-IP flags. Databases are memory-mapped and hot-reloaded without
//!   blocking lookups (see [`db`] on how to replace files safely).
//! - [`Policy`] compiles `[geofence]` and decides who may be served by which node and which
//!   nodes may onboard (see [`policy`] for the exact semantics).
//! - [`distance_km`] and [`estimated_rtt_ms`] feed routing.
//!
//! A country-only database (the embedded one, or a Country database) cannot see
//! subdivisions: policy members such as `UA-43` (Crimea) need a City database.

mod centroids;
pub mod country;
pub mod db;
pub mod distance;
pub mod embedding;
pub mod location;
pub mod policy;
mod report;

pub use country::{Continent, Country, Subdivision};
pub use db::{
    embedded_database_bytes, DbInfo, GeoDb, GeoError, GeoInfo, ReloadOutcome, ReloadReport, Schema,
};
pub use distance::{distance_km, estimated_rtt_ms, EARTH_RADIUS_KM, PATH_STRETCH, RTT_KM_PER_MS};
pub use embedding::{embedded_ipv4, Embedded, EmbeddingKind, Nat64PrefixError, Nat64Prefixes};
pub use location::{
    country_centroid, country_continent, known_countries, AnonymousFlags, Coords, Location, Source,
};
pub use policy::{ClassId, CountrySet, Decision, Facts, Policy, PolicyError, RuleName, Side};
pub use report::lookup_report;
