//! Lookups against the embedded database, the MaxMind test databases and built test
//! databases; overrides; Anonymous-IP flags; bad input.

mod common;

use common::*;
use nearpath_config::GeoOverride;
use nearpath_geo::{
    country_centroid, known_countries, Country, EmbeddingKind, GeoDb, GeoError, Location, Schema,
    Source,
};
use std::collections::BTreeSet;

fn cc(loc: &Location) -> Option<&str> {
    loc.country.as_ref().map(|c| c.as_str())
}

#[test]
fn embedded_spot_checks() {
    let db = GeoDb::embedded().unwrap();
    let cases = [
        ("8.8.8.8", Some("US")),
        ("1.1.1.1", Some("AU")),
        ("114.114.114.114", Some("CN")),
        ("223.5.5.5", Some("CN")),
        ("77.88.8.8", Some("RU")),
        ("175.45.176.1", Some("KP")),
        ("81.2.69.142", Some("GB")),
        ("5.62.60.1", Some("DE")),
        ("2001:4860:4860::8888", Some("US")),
        ("127.0.0.1", None),
        ("10.0.0.1", None),
        ("::1", None),
    ];
    for (addr, want) in cases {
        let loc = db.lookup(ip(addr));
        assert_eq!(cc(&loc), want, "{addr}");
        if want.is_some() {
            // The flat schema has only a country: coordinates and continent come from the
            // country table.
            assert_eq!(loc.country_source, Source::Database, "{addr}");
            assert_eq!(loc.coords_source, Source::Centroid, "{addr}");
            assert_eq!(loc.coords, country_centroid(loc.country.unwrap()), "{addr}");
            assert!(loc.continent.is_some(), "{addr}");
            assert!(loc.subdivision.is_none(), "{addr}");
        } else {
            assert_eq!(loc, Location::UNKNOWN, "{addr}");
        }
    }
    assert_eq!(db.lookup(ip("8.8.8.8")).continent.unwrap().as_str(), "NA");
    let info = db.info();
    assert_eq!(info.database.source, "embedded");
    assert_eq!(info.database.schema, Schema::Flat);
    assert_eq!(info.database.database_type, "country ipvAll");
    assert!(info.database.build_epoch > 1_700_000_000);
    assert!(info.anonymous_ip_database.is_none());
    assert_eq!(info.decode_errors, 0);
}

#[test]
fn ipv4_mapped_ipv6_is_looked_up_as_ipv4() {
    let db = GeoDb::embedded().unwrap();
    for (mapped, plain) in [
        ("::ffff:8.8.8.8", "8.8.8.8"),
        ("::ffff:175.45.176.1", "175.45.176.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
    ] {
        let mut loc = db.lookup(ip(mapped));
        assert_eq!(
            loc.embedded.map(|e| (e.kind, e.ipv4.to_string())),
            Some((EmbeddingKind::Ipv4Mapped, plain.to_string())),
            "{mapped}"
        );
        loc.embedded = None;
        assert_eq!(loc, db.lookup(ip(plain)), "{mapped}");
    }
    assert_eq!(cc(&db.lookup(ip("::ffff:77.88.8.8"))), Some("RU"));
}

#[test]
fn maxmind_city_database() {
    let db = GeoDb::open(&geo_config(Some(testdata("GeoIP2-City-Test.mmdb")), None)).unwrap();
    let info = db.info();
    assert_eq!(info.database.database_type, "GeoIP2-City");
    assert_eq!(info.database.schema, Schema::GeoIp2);
    assert_eq!(info.database.build_epoch, 1770245369);
    assert_eq!(info.database.node_count, 1547);

    let london = db.lookup(ip("81.2.69.142"));
    assert_eq!(cc(&london), Some("GB"));
    assert_eq!(london.subdivision.unwrap().as_str(), "GB-ENG");
    assert_eq!(london.continent.unwrap().as_str(), "EU");
    let c = london.coords.unwrap();
    assert_eq!((c.lat, c.lon), (51.5142, -0.0931));
    assert_eq!(london.accuracy_km, Some(10));
    assert_eq!(london.coords_source, Source::Database);
    assert_eq!(london.country_source, Source::Database);

    // The first subdivision is the largest: England, not West Berkshire.
    assert_eq!(
        db.lookup(ip("2.2.3.1")).subdivision.unwrap().as_str(),
        "GB-ENG"
    );
    let changchun = db.lookup(ip("175.16.199.1"));
    assert_eq!(changchun.subdivision.unwrap().as_str(), "CN-22");

    // IPv6 networks.
    let ir = db.lookup(ip("2a02:d2c0::1"));
    assert_eq!(cc(&ir), Some("IR"));
    assert_eq!(ir.coords.unwrap().lat, 32.0);
    assert_eq!(cc(&db.lookup(ip("2001:480:10::1"))), Some("US"));

    // A record with only a continent: country unknown, continent kept.
    let cont_only = db.lookup(ip("2.3.3.1"));
    assert_eq!(cont_only.country, None);
    assert_eq!(cont_only.country_source, Source::None);
    assert_eq!(cont_only.continent.unwrap().as_str(), "EU");
    assert!(cont_only.coords.is_none());
    // A record with a location but no country.
    let loc_only = db.lookup(ip("2a02:d500::1"));
    assert_eq!(loc_only.country, None);
    assert_eq!(loc_only.coords_source, Source::Database);
    // No record at all.
    assert_eq!(db.lookup(ip("10.0.0.1")), Location::UNKNOWN);
}

#[test]
fn maxmind_country_databases_fill_centroids() {
    for name in ["GeoIP2-Country-Test.mmdb", "GeoLite2-Country-Test.mmdb"] {
        let db = GeoDb::open(&geo_config(Some(testdata(name)), None)).unwrap();
        assert_eq!(db.info().database.schema, Schema::GeoIp2);
        let se = db.lookup(ip("89.160.20.113"));
        assert_eq!(cc(&se), Some("SE"), "{name}");
        assert_eq!(se.coords_source, Source::Centroid, "{name}");
        assert_eq!(se.coords, country_centroid(Country::parse("SE").unwrap()));
        assert!(
            se.subdivision.is_none(),
            "a Country database has no subdivisions"
        );
        assert_eq!(se.continent.unwrap().as_str(), "EU");
        assert_eq!(cc(&db.lookup(ip("2a02:d880::1"))), Some("RU"), "{name}");
    }
    let lite_city =
        GeoDb::open(&geo_config(Some(testdata("GeoLite2-City-Test.mmdb")), None)).unwrap();
    assert_eq!(cc(&lite_city.lookup(ip("214.78.0.1"))), Some("US"));
}

#[test]
fn built_city_database_with_subdivisions() {
    let dir = tempfile::tempdir().unwrap();
    let db = GeoDb::open(&geo_config(Some(write_world(dir.path())), None)).unwrap();
    let crimea = db.lookup(ip("176.104.40.1"));
    assert_eq!(crimea.subdivision.unwrap().as_str(), "UA-43");
    assert_eq!(cc(&crimea), Some("UA"));
    let kyiv = db.lookup(ip("31.128.1.1"));
    assert_eq!(kyiv.subdivision.unwrap().as_str(), "UA-30");
    assert_eq!(cc(&db.lookup(ip("2001:db8:1::5"))), Some("KP"));
    assert_eq!(
        db.lookup(ip("2001:db8:2::5")).subdivision.unwrap().as_str(),
        "UA-43"
    );
    assert_eq!(
        db.lookup(ip("::ffff:175.45.176.9")).country,
        db.lookup(ip("175.45.176.9")).country
    );
}

#[test]
fn overrides_longest_prefix_and_mapped_addresses() {
    let mut cfg = geo_config(None, None);
    cfg.overrides = vec![
        ovr("10.0.0.0/8", "US", None),
        ovr("10.1.0.0/16", "CN", None),
        ovr("127.0.0.2/32", "CN", None),
        ovr("2001:db8::/32", "KP", None),
        ovr("::ffff:192.0.2.0/120", "UA", Some("UA-43")),
        GeoOverride {
            cidr: "127.0.0.3/32".parse().unwrap(),
            country: "DE".into(),
            subdivision: None,
            lat: Some(50.1),
            lon: Some(8.7),
        },
        // Overrides win over the database: 8.8.8.8 is US in the embedded one.
        ovr("8.8.8.8/32", "FR", None),
    ];
    let db = GeoDb::open(&cfg).unwrap();
    assert_eq!(db.info().overrides, 7);
    let want = [
        ("10.2.3.4", "US"),
        ("10.1.2.3", "CN"),
        ("10.1.255.255", "CN"),
        ("127.0.0.2", "CN"),
        ("::ffff:127.0.0.2", "CN"),
        ("::ffff:10.1.0.1", "CN"),
        ("2001:db8:ffff::1", "KP"),
        ("192.0.2.7", "UA"),
        ("::ffff:192.0.2.7", "UA"),
        ("8.8.8.8", "FR"),
        ("8.8.4.4", "US"),
    ];
    for (addr, country) in want {
        assert_eq!(cc(&db.lookup(ip(addr))), Some(country), "{addr}");
    }
    let cn = db.lookup(ip("127.0.0.2"));
    assert_eq!(cn.country_source, Source::Override);
    assert_eq!(cn.coords_source, Source::Centroid);
    assert_eq!(
        db.lookup(ip("192.0.2.7")).subdivision.unwrap().as_str(),
        "UA-43"
    );
    let de = db.lookup(ip("127.0.0.3"));
    assert_eq!(de.coords_source, Source::Override);
    assert_eq!(de.coords.unwrap().lat, 50.1);
    // Outside every override: the database (no record for loopback).
    assert_eq!(db.lookup(ip("127.0.0.1")), Location::UNKNOWN);
    assert_eq!(db.lookup(ip("fd00::1")), Location::UNKNOWN);
}

#[test]
fn bad_overrides_are_refused() {
    let cases: Vec<(GeoOverride, &str)> = vec![
        (ovr("10.0.0.0/8", "USA", None), "country"),
        (ovr("10.0.0.0/8", "UA", Some("RU-43")), "not in country"),
        (ovr("10.0.0.0/8", "UA", Some("UA43")), "subdivision"),
        (
            GeoOverride {
                lat: Some(10.0),
                ..ovr("10.0.0.0/8", "US", None)
            },
            "both lat and lon",
        ),
        (
            GeoOverride {
                lat: Some(100.0),
                lon: Some(0.0),
                ..ovr("10.0.0.0/8", "US", None)
            },
            "out of range",
        ),
    ];
    for (o, needle) in cases {
        let mut cfg = geo_config(None, None);
        cfg.overrides = vec![o];
        let err = GeoDb::open(&cfg).unwrap_err();
        assert!(matches!(err, GeoError::BadOverride { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        assert!(err.to_string().contains("10.0.0.0/8"), "{err}");
        assert!(!err.retry_may_help());
    }
    let mut cfg = geo_config(None, None);
    cfg.overrides = vec![ovr("10.0.0.0/8", "US", None), ovr("10.0.0.0/8", "CN", None)];
    assert!(GeoDb::open(&cfg).is_err(), "duplicate prefix");
}

#[test]
fn anonymous_ip_database_flags() {
    let db = GeoDb::open(&geo_config(
        Some(testdata("GeoIP2-City-Test.mmdb")),
        Some(testdata("GeoIP2-Anonymous-IP-Test.mmdb")),
    ))
    .unwrap();
    let info = db.info().anonymous_ip_database.unwrap();
    assert_eq!(info.schema, Schema::AnonymousIp);
    assert_eq!(info.database_type, "GeoIP2-Anonymous-IP");

    // Every flag, and a City record for the same address.
    let all = db.lookup(ip("81.2.69.143"));
    assert_eq!(cc(&all), Some("GB"));
    let a = all.anonymous;
    assert!(
        a.anonymous
            && a.anonymous_vpn
            && a.hosting_provider
            && a.public_proxy
            && a.residential_proxy
            && a.tor_exit_node
    );
    let vpn_tor = db.lookup(ip("1.124.213.1")).anonymous;
    assert!(vpn_tor.anonymous_vpn && vpn_tor.tor_exit_node && !vpn_tor.hosting_provider);
    assert!(db.lookup(ip("6.1.0.2")).anonymous.hosting_provider);
    assert!(db.lookup(ip("6.1.0.3")).anonymous.public_proxy);
    assert!(db.lookup(ip("6.1.0.4")).anonymous.residential_proxy);
    assert!(db.lookup(ip("65.1.2.3")).anonymous.tor_exit_node);
    assert!(db.lookup(ip("2001:480:3a::1")).anonymous.public_proxy);
    // 8.8.8.8 has an empty record: found, but not anonymous.
    assert_eq!(db.lookup(ip("8.8.8.8")).anonymous, Default::default());
    // Without an Anonymous-IP database nothing is anonymous.
    let plain = GeoDb::open(&geo_config(Some(testdata("GeoIP2-City-Test.mmdb")), None)).unwrap();
    assert_eq!(
        plain.lookup(ip("81.2.69.143")).anonymous,
        Default::default()
    );
}

#[test]
fn bad_database_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("missing.mmdb");
    let err = GeoDb::open(&geo_config(Some(missing.clone()), None)).unwrap_err();
    assert!(matches!(err, GeoError::Io { .. }), "{err}");
    assert_eq!(err.path(), Some(missing.as_path()));
    assert!(err.to_string().contains("missing.mmdb"), "{err}");
    assert!(err.retry_may_help());

    let city = std::fs::read(testdata("GeoIP2-City-Test.mmdb")).unwrap();
    for (name, bytes) in [
        ("truncated.mmdb", city[..city.len() / 2].to_vec()),
        ("truncated-tail.mmdb", city[..city.len() - 10].to_vec()),
        ("empty.mmdb", Vec::new()),
        ("garbage.mmdb", b"this is not a database".repeat(100)),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let err = GeoDb::open(&geo_config(Some(path.clone()), None)).unwrap_err();
        assert!(matches!(err, GeoError::Corrupt { .. }), "{name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
        assert!(!err.retry_may_help(), "{name}");
        // The same file as Anonymous-IP database fails the same way.
        let err = GeoDb::open(&geo_config(None, Some(path))).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }

    // The search tree overwritten with 0xFF: the metadata is intact, the tree points nowhere.
    let mut smashed = city.clone();
    let tree_bytes = 1547 * 28 / 4;
    smashed[..tree_bytes].fill(0xFF);
    let path = dir.path().join("smashed.mmdb");
    std::fs::write(&path, &smashed).unwrap();
    let err = GeoDb::open(&geo_config(Some(path), None)).unwrap_err();
    assert!(matches!(err, GeoError::Corrupt { .. }), "{err}");

    // Valid files of the wrong kind.
    let err = GeoDb::open(&geo_config(Some(testdata("GeoLite2-ASN-Test.mmdb")), None)).unwrap_err();
    assert!(matches!(err, GeoError::WrongType { .. }), "{err}");
    assert!(err.to_string().contains("GeoLite2-ASN"), "{err}");
    let err = GeoDb::open(&geo_config(None, Some(testdata("GeoIP2-City-Test.mmdb")))).unwrap_err();
    assert!(matches!(err, GeoError::WrongType { .. }), "{err}");

    // A directory.
    let err = GeoDb::open(&geo_config(Some(dir.path().to_path_buf()), None)).unwrap_err();
    assert!(matches!(err, GeoError::Io { .. }), "{err}");
}

#[test]
fn records_that_do_not_fit_the_schema_are_refused_at_load() {
    // A GeoIP2-typed database whose accuracy_radius is a string: lookups would fail to decode.
    let mut w = mmdb_writer::Writer::new("GeoIP2-City");
    w.insert_value(
        "8.8.8.0/24".parse::<ipnet::IpNet>().unwrap(),
        mmdb_writer::Value::map([(
            "location",
            mmdb_writer::Value::map([("accuracy_radius", mmdb_writer::Value::from("far"))]),
        )]),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.mmdb");
    std::fs::write(&path, w.to_bytes().unwrap()).unwrap();
    let err = GeoDb::open(&geo_config(Some(path), None)).unwrap_err();
    assert!(matches!(err, GeoError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("odd.mmdb"), "{err}");
}

#[test]
fn flat_schema_file_with_coordinates() {
    let mut w = mmdb_writer::Writer::new("ip-location-db city");
    w.insert_value(
        "203.0.113.0/24".parse::<ipnet::IpNet>().unwrap(),
        mmdb_writer::Value::map([
            ("country_code", mmdb_writer::Value::from("JP")),
            ("latitude", mmdb_writer::Value::from(35.5f32)),
            ("longitude", mmdb_writer::Value::from(139.5f64)),
        ]),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flat.mmdb");
    std::fs::write(&path, w.to_bytes().unwrap()).unwrap();
    let db = GeoDb::open(&geo_config(Some(path), None)).unwrap();
    assert_eq!(db.info().database.schema, Schema::Flat);
    let jp = db.lookup(ip("203.0.113.9"));
    assert_eq!(cc(&jp), Some("JP"));
    assert_eq!(jp.coords_source, Source::Database);
    assert_eq!(jp.coords.unwrap().lat, 35.5);
    assert_eq!(jp.continent.unwrap().as_str(), "AS");
}

#[test]
fn every_iso_country_has_a_centroid() {
    let codes = nearpath_config::ISO_3166_1_ALPHA2;
    assert_eq!(codes.len(), 249);
    let known: BTreeSet<Country> = known_countries().collect();
    for code in codes.iter().chain([&nearpath_config::KOSOVO]) {
        let c = Country::parse(code).unwrap();
        assert!(known.contains(&c), "{code} missing from the table");
        let p = country_centroid(c).unwrap_or_else(|| panic!("{code} has no centroid"));
        assert!(p.lat.abs() <= 90.0 && p.lon.abs() <= 180.0, "{code}");
        assert!(nearpath_geo::country_continent(c).is_some(), "{code}");
    }
}

#[test]
fn every_embedded_country_has_a_centroid() {
    // Every country the embedded database can answer gets coordinates: walk a spread of
    // addresses and check that a known country never lacks them.
    let db = GeoDb::embedded().unwrap();
    let mut seen = BTreeSet::new();
    for a in (0u32..=u32::MAX).step_by(1 << 18) {
        let loc = db.lookup(std::net::IpAddr::V4(a.into()));
        if let Some(c) = loc.country {
            assert!(loc.coords.is_some(), "{} at {a:#x}", c.as_str());
            seen.insert(c);
        }
    }
    assert!(seen.len() > 100, "only {} countries seen", seen.len());
}

/// IPv6 spellings of the North Korean 175.45.176.1 (af2d:b001): each must be located in KP.
const KP_EMBEDDINGS: [(&str, EmbeddingKind); 6] = [
    ("2002:af2d:b001::1", EmbeddingKind::SixToFour),
    ("2001:0:4136:e378:8000:0:50d2:4ffe", EmbeddingKind::Teredo),
    ("64:ff9b::af2d:b001", EmbeddingKind::Nat64),
    ("::175.45.176.1", EmbeddingKind::Ipv4Compatible),
    ("::ffff:0:175.45.176.1", EmbeddingKind::Ipv4Translated),
    ("::ffff:175.45.176.1", EmbeddingKind::Ipv4Mapped),
];

#[test]
fn addresses_embedding_ipv4_are_located_by_the_ipv4_address() {
    // Before: 2002:af2d:b001::1 (6to4 of a North Korean address) was unknown, and served every
    // uncontrolled class, sanctions included.
    let db = GeoDb::embedded().unwrap();
    let plain = db.lookup(ip("175.45.176.1"));
    assert_eq!(cc(&plain), Some("KP"));
    for (addr, kind) in KP_EMBEDDINGS {
        let mut loc = db.lookup(ip(addr));
        assert_eq!(cc(&loc), Some("KP"), "{addr}");
        let e = loc.embedded.expect("the embedding is reported");
        assert_eq!(
            (e.kind, e.ipv4.to_string()),
            (kind, "175.45.176.1".into()),
            "{addr}"
        );
        loc.embedded = None;
        assert_eq!(loc, plain, "{addr}");
    }
    // A plain IPv6 address is looked up as itself and reports no embedding.
    let google = db.lookup(ip("2001:4860:4860::8888"));
    assert_eq!(cc(&google), Some("US"));
    assert!(google.embedded.is_none());
    assert!(db.lookup(ip("::1")).embedded.is_none());
}

#[test]
fn configured_nat64_prefixes_embed_ipv4_at_every_rfc_6052_length() {
    for (prefix, addr) in [
        ("64:ff9b:1::/96", "64:ff9b:1::af2d:b001"),
        ("2001:db8:122::/48", "2001:db8:122:af2d:b0:100::"),
        ("2001:db8:100::/40", "2001:db8:1af:2db0:1::"),
    ] {
        let without = GeoDb::embedded().unwrap();
        assert!(without.lookup(ip(addr)).embedded.is_none(), "{addr}");
        let mut cfg = geo_config(None, None);
        cfg.nat64_prefixes = vec![prefix.parse().unwrap()];
        let db = GeoDb::open(&cfg).unwrap();
        let loc = db.lookup(ip(addr));
        assert_eq!(cc(&loc), Some("KP"), "{addr} under {prefix}");
        assert_eq!(loc.embedded.unwrap().kind, EmbeddingKind::Nat64);
    }
    let mut cfg = geo_config(None, None);
    cfg.nat64_prefixes = vec!["64:ff9b:1::/50".parse().unwrap()];
    assert!(matches!(
        GeoDb::open(&cfg),
        Err(GeoError::BadNat64Prefix(_))
    ));
}

#[test]
fn embedded_ipv4_wins_over_records_and_overrides_for_the_ipv6_range() {
    // A database that aliases 6to4 and Teredo space into its IPv4 tree, as MaxMind's writers
    // (and mmdb-writer) do, answers for Teredo the *server's* address (bits 32..64, here
    // 8.8.8.1 in the US), not the client's: the embedded client address must decide. Overrides
    // and the Anonymous-IP flags are matched by the embedded IPv4 address too.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = geo_config(Some(write_world(dir.path())), None);
    cfg.overrides = vec![ovr("10.9.0.0/16", "CU", None)];
    let db = GeoDb::open(&cfg).unwrap();
    assert_eq!(cc(&db.lookup(ip("2002:af2d:b001::1"))), Some("KP"));
    let teredo = "2001:0:808:801:8000:0:50d2:4ffe";
    let raw = maxminddb::Reader::from_source(std::fs::read(dir.path().join("world.mmdb")).unwrap())
        .unwrap();
    let server: Option<serde_json::Value> = raw.lookup(ip(teredo)).unwrap().decode().unwrap();
    assert_eq!(server.unwrap()["country"]["iso_code"], "US");
    assert_eq!(cc(&db.lookup(ip(teredo))), Some("KP"));
    // 6to4 of 10.9.0.1, which only an override knows.
    let loc = db.lookup(ip("2002:a09:1::1"));
    assert_eq!(cc(&loc), Some("CU"));
    assert_eq!(loc.country_source, Source::Override);
    assert_eq!(loc.embedded.unwrap().kind, EmbeddingKind::SixToFour);
}
