//! What a lookup answers: [`Location`] and its parts.

use crate::centroids::{CentroidRow, CENTROIDS};
use crate::country::{Continent, Country, Subdivision};
use crate::embedding::Embedded;
use nearpath_config::AnonymousFlag;
use serde::Serialize;

/// A point on Earth in degrees (WGS 84).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Coords {
    /// Latitude, -90..=90.
    pub lat: f64,
    /// Longitude, -180..=180.
    pub lon: f64,
}

/// Where a part of a [`Location`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The GeoIP database record.
    Database,
    /// A static `[[geo.overrides]]` entry.
    Override,
    /// The country's centroid table (the database or override named only a country).
    Centroid,
    /// Nothing is known.
    #[default]
    None,
}

/// The six GeoIP2 Anonymous-IP flags. All false when no Anonymous-IP database is configured or
/// the address has no record (that database stores empty records for most ranges, and an empty
/// record means "not anonymous").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct AnonymousFlags {
    pub anonymous: bool,
    pub anonymous_vpn: bool,
    pub hosting_provider: bool,
    pub public_proxy: bool,
    pub residential_proxy: bool,
    pub tor_exit_node: bool,
}

impl AnonymousFlags {
    /// The value of one flag.
    pub fn get(&self, flag: AnonymousFlag) -> bool {
        match flag {
            AnonymousFlag::Anonymous => self.anonymous,
            AnonymousFlag::AnonymousVpn => self.anonymous_vpn,
            AnonymousFlag::HostingProvider => self.hosting_provider,
            AnonymousFlag::PublicProxy => self.public_proxy,
            AnonymousFlag::ResidentialProxy => self.residential_proxy,
            AnonymousFlag::TorExitNode => self.tor_exit_node,
        }
    }

    /// Whether any of `flags` is set.
    pub fn any(&self, flags: &[AnonymousFlag]) -> bool {
        flags.iter().any(|f| self.get(*f))
    }

    /// The flags as a bitmask (bit i = flag i in [`AnonymousFlags::bit`] order), which the policy
    /// engine tests against a precompiled mask.
    pub fn bits(&self) -> u8 {
        (self.anonymous as u8)
            | (self.anonymous_vpn as u8) << 1
            | (self.hosting_provider as u8) << 2
            | (self.public_proxy as u8) << 3
            | (self.residential_proxy as u8) << 4
            | (self.tor_exit_node as u8) << 5
    }

    /// The bit of one flag in [`AnonymousFlags::bits`].
    pub fn bit(flag: AnonymousFlag) -> u8 {
        match flag {
            AnonymousFlag::Anonymous => 1,
            AnonymousFlag::AnonymousVpn => 1 << 1,
            AnonymousFlag::HostingProvider => 1 << 2,
            AnonymousFlag::PublicProxy => 1 << 3,
            AnonymousFlag::ResidentialProxy => 1 << 4,
            AnonymousFlag::TorExitNode => 1 << 5,
        }
    }
}

/// Everything a lookup knows about an address. `Copy`, so that it can be stored per node and
/// passed around without allocation.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Location {
    /// ISO 3166-1 alpha-2 country; `None` when unknown. From GeoIP2 records this is `country`
    /// (where the address is used), never `registered_country` (where the block is
    /// registered): a record without `country` (anycast ranges, for one) is unknown.
    pub country: Option<Country>,
    /// ISO 3166-2 subdivision with country prefix (`UA-43`), only from a City database (the
    /// first, largest subdivision of the record) or an override. A country-only database never
    /// has one, so policies that list subdivisions cannot see them with such a database.
    pub subdivision: Option<Subdivision>,
    /// Continent code, from the database or, when it has none, from the country table.
    pub continent: Option<Continent>,
    /// Coordinates: the database's point, an override's, or the country centroid.
    pub coords: Option<Coords>,
    /// The database's accuracy radius in km (GeoIP2 `location.accuracy_radius`), when given.
    pub accuracy_km: Option<u16>,
    /// Where `country` (and `subdivision`) came from.
    pub country_source: Source,
    /// Where `coords` came from.
    pub coords_source: Source,
    /// Anonymous-IP flags.
    pub anonymous: AnonymousFlags,
    /// When the address looked up was IPv6 embedding an IPv4 address (6to4, Teredo, NAT64,
    /// IPv4-mapped, ...), that IPv4 address and the embedding: everything above describes the
    /// IPv4 address. `None` for a plain address.
    pub embedded: Option<Embedded>,
}

impl Location {
    /// A location with nothing known (no record).
    pub const UNKNOWN: Location = Location {
        country: None,
        subdivision: None,
        continent: None,
        coords: None,
        accuracy_km: None,
        country_source: Source::None,
        coords_source: Source::None,
        anonymous: AnonymousFlags {
            anonymous: false,
            anonymous_vpn: false,
            hosting_provider: false,
            public_proxy: false,
            residential_proxy: false,
            tor_exit_node: false,
        },
        embedded: None,
    };

    /// A location that knows only a country, with its centroid and continent filled in, as a
    /// country-only database answers. Useful for tests and for callers that hold a country code.
    pub fn from_country(country: Country) -> Location {
        let mut loc = Location {
            country: Some(country),
            country_source: Source::Database,
            ..Location::UNKNOWN
        };
        loc.fill_from_country_table();
        loc
    }

    /// Whether the location is unknown for policy purposes (no country).
    pub fn is_unknown(&self) -> bool {
        self.country.is_none()
    }

    /// Fills continent and coordinates from the country table where the source left them empty.
    pub(crate) fn fill_from_country_table(&mut self) {
        let Some(country) = self.country else { return };
        let Some(row) = centroid_row(country) else {
            return;
        };
        if self.continent.is_none() {
            self.continent = Some(Continent::from_raw(row.continent));
        }
        if self.coords.is_none() {
            self.coords = Some(Coords {
                lat: row.lat,
                lon: row.lon,
            });
            self.coords_source = Source::Centroid;
            self.accuracy_km = None;
        }
    }
}

/// For each of the 26 x 26 two-letter codes, 1 + its row in `CENTROIDS`, or 0; built at
/// compile time so that a lookup costs one indexed load instead of a search.
static CENTROID_INDEX: [u16; 26 * 26] = build_centroid_index();

const fn build_centroid_index() -> [u16; 26 * 26] {
    let mut index = [0u16; 26 * 26];
    let mut i = 0;
    while i < CENTROIDS.len() {
        let c = CENTROIDS[i].code;
        // The generator writes only upper-case codes; anything else fails the build here.
        assert!(c[0].is_ascii_uppercase() && c[1].is_ascii_uppercase());
        index[(c[0] - b'A') as usize * 26 + (c[1] - b'A') as usize] = (i + 1) as u16;
        i += 1;
    }
    index
}

#[inline]
fn centroid_row(country: Country) -> Option<&'static CentroidRow> {
    match CENTROID_INDEX[country.index()] {
        0 => None,
        n => CENTROIDS.get(n as usize - 1),
    }
}

/// The centre point of a country from the bundled table (see `geo/data/CENTROIDS.md`), or
/// `None` for a code the table does not know.
pub fn country_centroid(country: Country) -> Option<Coords> {
    centroid_row(country).map(|r| Coords {
        lat: r.lat,
        lon: r.lon,
    })
}

/// The continent of a country from the bundled table, or `None` for an unknown code.
pub fn country_continent(country: Country) -> Option<Continent> {
    centroid_row(country).map(|r| Continent::from_raw(r.continent))
}

/// Every country code the centroid table knows, in order.
pub fn known_countries() -> impl Iterator<Item = Country> {
    CENTROIDS.iter().filter_map(|r| Country::from_bytes(r.code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centroid_table_is_sorted_unique_and_sane() {
        for w in CENTROIDS.windows(2) {
            assert!(w[0].code < w[1].code, "{:?} / {:?}", w[0].code, w[1].code);
        }
        for r in CENTROIDS {
            assert!(Country::from_bytes(r.code).is_some(), "{:?}", r.code);
            assert!((-90.0..=90.0).contains(&r.lat), "{:?}", r.code);
            assert!((-180.0..=180.0).contains(&r.lon), "{:?}", r.code);
            let cont = std::str::from_utf8(&r.continent).unwrap();
            assert!(
                ["AF", "AN", "AS", "EU", "NA", "OC", "SA"].contains(&cont),
                "{:?} {cont}",
                r.code
            );
        }
    }

    #[test]
    fn from_country_fills_centroid_and_continent() {
        let us = Location::from_country(Country::parse("US").unwrap());
        assert_eq!(us.coords_source, Source::Centroid);
        let c = us.coords.unwrap();
        // The contiguous US spans roughly 25..49 N and 67..125 W; its centre lies inside.
        assert!((25.0..49.0).contains(&c.lat) && (-125.0..-67.0).contains(&c.lon));
        assert_eq!(us.continent.unwrap().as_str(), "NA");
        let unknown_code = Location::from_country(Country::parse("ZZ").unwrap());
        assert!(unknown_code.coords.is_none());
        assert_eq!(unknown_code.coords_source, Source::None);
    }

    #[test]
    fn anonymous_flags_bits_match_get() {
        use AnonymousFlag::*;
        let all = [
            Anonymous,
            AnonymousVpn,
            HostingProvider,
            PublicProxy,
            ResidentialProxy,
            TorExitNode,
        ];
        let mut seen = 0u8;
        for f in all {
            let b = AnonymousFlags::bit(f);
            assert_eq!(seen & b, 0, "bits must be distinct");
            seen |= b;
        }
        let flags = AnonymousFlags {
            hosting_provider: true,
            tor_exit_node: true,
            ..Default::default()
        };
        for f in all {
            assert_eq!(flags.get(f), flags.bits() & AnonymousFlags::bit(f) != 0);
        }
        assert!(flags.any(&[Anonymous, TorExitNode]));
        assert!(!flags.any(&[Anonymous, AnonymousVpn]));
        assert!(!flags.any(&[]));
    }
}
