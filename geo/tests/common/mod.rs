//! Shared test helpers: paths to the MaxMind test databases and a builder for small
//! GeoIP2-City-shaped databases written with `mmdb-writer`.
#![allow(dead_code)]

use ipnet::IpNet;
use mmdb_writer::{Value, Writer};
use nearpath_config::{GeoConfig, GeoOverride};
use nearpath_geo::{country_centroid, Country};
use std::path::{Path, PathBuf};

pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

/// One record of a test City database.
#[derive(Clone)]
pub struct Rec {
    pub country: Option<&'static str>,
    /// Subdivision part after the hyphen, as GeoIP2 stores it (`"43"` for UA-43).
    pub subdivisions: Vec<&'static str>,
    pub continent: Option<&'static str>,
    /// Coordinates and accuracy radius.
    pub location: Option<(f64, f64, u16)>,
}

impl Rec {
    /// A country record whose location is the country's centroid from the crate's table, so
    /// that no coordinate is made up here either.
    pub fn country(cc: &'static str) -> Rec {
        let c = country_centroid(Country::parse(cc).unwrap()).unwrap();
        Rec {
            country: Some(cc),
            subdivisions: vec![],
            continent: None,
            location: Some((c.lat, c.lon, 100)),
        }
    }

    pub fn sub(mut self, code: &'static str) -> Rec {
        self.subdivisions.push(code);
        self
    }

    fn value(&self) -> Value {
        let mut entries: Vec<(&str, Value)> = Vec::new();
        if let Some(cc) = self.country {
            entries.push((
                "country",
                Value::map([
                    ("iso_code", Value::from(cc)),
                    ("names", Value::map([("en", Value::from("test"))])),
                ]),
            ));
        }
        if let Some(c) = self.continent {
            entries.push(("continent", Value::map([("code", Value::from(c))])));
        }
        if let Some((lat, lon, acc)) = self.location {
            entries.push((
                "location",
                Value::map([
                    ("latitude", Value::from(lat)),
                    ("longitude", Value::from(lon)),
                    ("accuracy_radius", Value::from(acc)),
                ]),
            ));
        }
        if !self.subdivisions.is_empty() {
            entries.push((
                "subdivisions",
                Value::array(
                    self.subdivisions
                        .iter()
                        .map(|s| Value::map([("iso_code", Value::from(*s))])),
                ),
            ));
        }
        Value::map(entries)
    }
}

/// Bytes of a GeoIP2-City-shaped database holding `records`.
pub fn city_db(records: &[(&str, Rec)]) -> Vec<u8> {
    let mut w = Writer::new("GeoIP2-City");
    for (net, rec) in records {
        w.insert_value(net.parse::<IpNet>().unwrap(), rec.value())
            .unwrap();
    }
    w.to_bytes().unwrap()
}

/// The test world used by the policy tests: places the MaxMind test databases lack.
pub fn world_records() -> Vec<(&'static str, Rec)> {
    vec![
        ("175.45.176.0/22", Rec::country("KP")),
        ("152.206.0.0/15", Rec::country("CU")),
        ("5.0.0.0/16", Rec::country("SY")),
        ("114.114.0.0/16", Rec::country("CN")),
        ("77.88.0.0/18", Rec::country("RU")),
        ("8.8.8.0/24", Rec::country("US")),
        ("5.62.0.0/16", Rec::country("DE")),
        ("2.0.0.0/12", Rec::country("FR")),
        ("31.128.0.0/16", Rec::country("UA").sub("30")), // Kyiv city
        ("176.104.32.0/19", Rec::country("UA").sub("43")), // Crimea
        ("91.200.0.0/16", Rec::country("UA").sub("14")), // Donetsk oblast
        ("2001:db8:1::/48", Rec::country("KP")),
        ("2001:db8:2::/48", Rec::country("UA").sub("43")),
        ("2001:db8:3::/48", Rec::country("US")),
        ("2001:db8:4::/48", Rec::country("CN")),
    ]
}

/// Writes the test world to `dir/world.mmdb` and returns the path.
pub fn write_world(dir: &Path) -> PathBuf {
    let path = dir.join("world.mmdb");
    std::fs::write(&path, city_db(&world_records())).unwrap();
    path
}

pub fn geo_config(database: Option<PathBuf>, anonymous: Option<PathBuf>) -> GeoConfig {
    GeoConfig {
        database,
        anonymous_ip_database: anonymous,
        overrides: vec![],
        ..GeoConfig::default()
    }
}

pub fn ovr(cidr: &str, country: &str, subdivision: Option<&str>) -> GeoOverride {
    GeoOverride {
        cidr: cidr.parse().unwrap(),
        country: country.into(),
        subdivision: subdivision.map(Into::into),
        lat: None,
        lon: None,
    }
}
