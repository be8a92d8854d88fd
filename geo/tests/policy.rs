//! The default geofence rules and the policy knobs, with locations from real lookups.

mod common;

use common::*;
use nearpath_config::{
    AnonymousFlag, AnonymousPolicy, GeofenceConfig, GeofenceRule, UnknownPolicy, WorkloadKind,
};
use nearpath_geo::{lookup_report, ClassId, Decision, GeoDb, Location, Policy, Side};
use WorkloadKind::{Game, Inference};

/// The built test world (KP, CU, SY, UA subdivisions, ...) plus overrides for loopback.
fn world_db(dir: &std::path::Path) -> GeoDb {
    let mut cfg = geo_config(Some(write_world(dir)), None);
    cfg.overrides = vec![
        ovr("127.0.0.2/32", "CN", None),
        ovr("127.0.0.3/32", "UA", Some("UA-43")),
        ovr("127.0.0.4/32", "DE", None),
    ];
    GeoDb::open(&cfg).unwrap()
}

fn default_policy() -> Policy {
    Policy::compile(&GeofenceConfig::default()).unwrap()
}

const CLASSES: [&str; 4] = ["h100", "rtx4090", "rtx3080", "cpu"];

fn assert_deny(d: &Decision, rule: &str, side: Side) {
    assert_eq!(d.rule(), Some(rule), "{d:?}");
    assert_eq!(d.side(), Some(side), "{d:?}");
    assert!(!d.reason().unwrap().is_empty());
}

fn assert_allow(d: &Decision) {
    assert!(d.is_allowed(), "{d:?}");
}

#[test]
fn sanctions_deny_clients_and_nodes_of_every_class() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let p = default_policy();
    let us = db.lookup(ip("8.8.8.8"));
    for addr in ["175.45.176.1", "152.206.1.1", "2001:db8:1::1"] {
        let sanctioned = db.lookup(ip(addr));
        assert!(sanctioned.country.is_some(), "{addr}");
        for class in CLASSES {
            let id = p.class_id(class);
            for w in [Game, Inference] {
                assert_deny(
                    &p.check_serve(&sanctioned, &us, id, w),
                    "sanctions",
                    Side::Client,
                );
                assert_deny(
                    &p.check_serve(&us, &sanctioned, id, w),
                    "sanctions",
                    Side::Node,
                );
            }
            assert_deny(&p.check_onboard(&sanctioned, id), "sanctions", Side::Node);
        }
    }
    // Iran from the MaxMind City test database (IPv6 only there).
    let mm = GeoDb::open(&geo_config(Some(testdata("GeoIP2-City-Test.mmdb")), None)).unwrap();
    let ir = mm.lookup(ip("2a02:d2c0::1"));
    assert_deny(
        &p.check_serve(&ir, &us, p.class_id("cpu"), Game),
        "sanctions",
        Side::Client,
    );
    // KP from the embedded database.
    let emb = GeoDb::embedded().unwrap();
    let kp = emb.lookup(ip("175.45.176.1"));
    assert_deny(
        &p.check_serve(&kp, &us, p.class_id("rtx3080"), Game),
        "sanctions",
        Side::Client,
    );
}

#[test]
fn export_control_denies_only_controlled_classes() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let p = default_policy();
    let us = db.lookup(ip("8.8.8.8"));
    for addr in [
        "114.114.114.114",
        "77.88.8.8",
        "5.0.1.1",
        "2001:db8:4::1",
        "127.0.0.2",
    ] {
        let client = db.lookup(ip(addr));
        assert!(client.country.is_some(), "{addr}");
        for class in ["h100", "rtx4090", "RTX 4090", "a100", "mi300"] {
            let id = p.class_id(class);
            assert!(p.is_controlled(id), "{class}");
            let d = p.check_serve(&client, &us, id, Inference);
            assert_deny(&d, "export-control", Side::Client);
            assert_eq!(
                d.reason(),
                Some("export-controlled GPU classes are not available in this country")
            );
            // The node side: a controlled node there neither serves nor onboards.
            assert_deny(
                &p.check_serve(&us, &client, id, Game),
                "export-control",
                Side::Node,
            );
            assert_deny(&p.check_onboard(&client, id), "export-control", Side::Node);
        }
        for class in ["rtx3080", "rtx4080", "cpu", "some-new-card"] {
            let id = p.class_id(class);
            assert!(!p.is_controlled(id), "{class}");
            assert_allow(&p.check_serve(&client, &us, id, Game));
            assert_allow(&p.check_serve(&us, &client, id, Inference));
            assert_allow(&p.check_onboard(&client, id));
        }
    }
    // Allowed everywhere else.
    let de = db.lookup(ip("5.62.1.1"));
    assert_allow(&p.check_serve(&de, &us, p.class_id("h100"), Inference));
    assert_allow(&p.check_onboard(&de, p.class_id("h100")));
}

#[test]
fn eu_residency_is_off_by_default_and_works_when_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let de = db.lookup(ip("5.62.1.1"));
    let fr = db.lookup(ip("2.1.1.1"));
    let us = db.lookup(ip("8.8.8.8"));
    let cpu = |p: &Policy| p.class_id("cpu");

    let p = default_policy();
    assert!(!p.rule_names().any(|r| r == "eu-residency"));
    assert_allow(&p.check_serve(&de, &us, cpu(&p), Game));

    let mut cfg = GeofenceConfig::default();
    for r in &mut cfg.rules {
        if r.name == "eu-residency" {
            r.enabled = true;
        }
    }
    let p = Policy::compile(&cfg).unwrap();
    let d = p.check_serve(&de, &us, cpu(&p), Game);
    assert_deny(&d, "eu-residency", Side::Pair);
    assert_eq!(d.reason(), Some("EU clients are served only from EU nodes"));
    assert_allow(&p.check_serve(&de, &fr, cpu(&p), Game));
    assert_allow(&p.check_serve(&us, &de, cpu(&p), Game));
    assert_allow(&p.check_serve(&us, &us, cpu(&p), Game));
    // Residency needs a node: onboarding a US node and a client-only check are unaffected.
    assert_allow(&p.check_onboard(&us, cpu(&p)));
    assert_allow(&p.check_client(&de, cpu(&p), Game));
}

#[test]
fn subdivisions_need_a_city_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let p = default_policy();
    let us = db.lookup(ip("8.8.8.8"));
    let rtx = p.class_id("rtx3080");

    let crimea = db.lookup(ip("176.104.40.1"));
    assert_deny(
        &p.check_serve(&crimea, &us, rtx, Game),
        "sanctions",
        Side::Client,
    );
    assert_deny(&p.check_onboard(&crimea, rtx), "sanctions", Side::Node);
    let crimea6 = db.lookup(ip("2001:db8:2::1"));
    assert_deny(
        &p.check_serve(&crimea6, &us, rtx, Game),
        "sanctions",
        Side::Client,
    );
    let donetsk = db.lookup(ip("91.200.1.1"));
    assert_deny(
        &p.check_serve(&donetsk, &us, rtx, Game),
        "sanctions",
        Side::Client,
    );
    // Kyiv is Ukraine but not a sanctioned region; Ukraine is not export-controlled either.
    let kyiv = db.lookup(ip("31.128.1.1"));
    assert_eq!(kyiv.subdivision.unwrap().as_str(), "UA-30");
    assert_allow(&p.check_serve(&kyiv, &us, rtx, Game));
    assert_allow(&p.check_serve(&kyiv, &us, p.class_id("h100"), Game));
    assert_allow(&p.check_onboard(&kyiv, p.class_id("h100")));
    // An override can carry a subdivision.
    let crimea_override = db.lookup(ip("127.0.0.3"));
    assert_deny(
        &p.check_serve(&crimea_override, &us, rtx, Game),
        "sanctions",
        Side::Client,
    );
    // A country-only answer for the same place: UA without subdivision is allowed, which is
    // why the docs say subdivision rules need a City database.
    let ua_only = Location::from_country(crimea.country.unwrap());
    assert_allow(&p.check_serve(&ua_only, &us, rtx, Game));
}

#[test]
fn unknown_location_denies_controlled_and_allows_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let p = default_policy();
    let us = db.lookup(ip("8.8.8.8"));
    let unknown = db.lookup(ip("127.0.0.1"));
    assert_eq!(unknown, Location::UNKNOWN);
    for class in ["h100", "l40s"] {
        let id = p.class_id(class);
        assert_deny(
            &p.check_serve(&unknown, &us, id, Game),
            "unknown-location",
            Side::Client,
        );
        assert_deny(
            &p.check_serve(&us, &unknown, id, Game),
            "unknown-location",
            Side::Node,
        );
        assert_deny(
            &p.check_onboard(&unknown, id),
            "unknown-location",
            Side::Node,
        );
    }
    for class in ["rtx3080", "cpu", "never-heard-of-it"] {
        let id = p.class_id(class);
        assert_allow(&p.check_serve(&unknown, &us, id, Game));
        assert_allow(&p.check_serve(&us, &unknown, id, Game));
        assert_allow(&p.check_onboard(&unknown, id));
    }

    // Flip both knobs.
    let cfg = GeofenceConfig {
        unknown_location_controlled: UnknownPolicy::Allow,
        unknown_location_uncontrolled: UnknownPolicy::Deny,
        ..GeofenceConfig::default()
    };
    let p = Policy::compile(&cfg).unwrap();
    assert_allow(&p.check_serve(&unknown, &us, p.class_id("h100"), Game));
    assert_deny(
        &p.check_serve(&unknown, &us, p.class_id("cpu"), Game),
        "unknown-location",
        Side::Client,
    );
}

#[test]
fn anonymous_ip_policy() {
    // City test DB for location, Anonymous-IP test DB for flags, an override to give the
    // hosting-only address 6.1.0.2 a location.
    let mut cfg = geo_config(
        Some(testdata("GeoIP2-City-Test.mmdb")),
        Some(testdata("GeoIP2-Anonymous-IP-Test.mmdb")),
    );
    cfg.overrides = vec![ovr("6.1.0.0/24", "US", None), ovr("8.8.8.0/24", "US", None)];
    let db = GeoDb::open(&cfg).unwrap();
    let gb_anon = db.lookup(ip("81.2.69.143"));
    let us_hosting = db.lookup(ip("6.1.0.2"));
    let us_clean = db.lookup(ip("8.8.8.8"));
    assert!(gb_anon.country.is_some() && us_hosting.country.is_some());

    // Default: deny_controlled over all six flags.
    let p = default_policy();
    let h100 = p.class_id("h100");
    let rtx = p.class_id("rtx3080");
    let d = p.check_serve(&gb_anon, &us_clean, h100, Inference);
    assert_deny(&d, "anonymous-ip", Side::Client);
    assert!(d.facts().client_anonymous && !d.facts().node_anonymous);
    assert_allow(&p.check_serve(&gb_anon, &us_clean, rtx, Inference));
    assert_deny(
        &p.check_serve(&us_hosting, &us_clean, h100, Game),
        "anonymous-ip",
        Side::Client,
    );
    assert_deny(&p.check_onboard(&gb_anon, h100), "anonymous-ip", Side::Node);
    assert_deny(
        &p.check_serve(&us_clean, &us_hosting, h100, Game),
        "anonymous-ip",
        Side::Node,
    );
    assert_allow(&p.check_serve(&us_clean, &us_clean, h100, Game));

    // deny: every class.
    let p = Policy::compile(&GeofenceConfig {
        anonymous: AnonymousPolicy::Deny,
        ..GeofenceConfig::default()
    })
    .unwrap();
    assert_deny(
        &p.check_serve(&gb_anon, &us_clean, p.class_id("cpu"), Game),
        "anonymous-ip",
        Side::Client,
    );
    // allow: flags ignored.
    let p = Policy::compile(&GeofenceConfig {
        anonymous: AnonymousPolicy::Allow,
        ..GeofenceConfig::default()
    })
    .unwrap();
    assert_allow(&p.check_serve(&gb_anon, &us_clean, p.class_id("h100"), Game));
    // Only Tor counts: the hosting-only address passes, the all-flags one does not.
    let p = Policy::compile(&GeofenceConfig {
        anonymous: AnonymousPolicy::Deny,
        anonymous_flags: vec![AnonymousFlag::TorExitNode],
        ..GeofenceConfig::default()
    })
    .unwrap();
    assert_allow(&p.check_serve(&us_hosting, &us_clean, p.class_id("h100"), Game));
    assert_deny(
        &p.check_serve(&gb_anon, &us_clean, p.class_id("h100"), Game),
        "anonymous-ip",
        Side::Client,
    );
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
fn workload_limited_rules() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let fr = db.lookup(ip("2.1.1.1"));
    let de = db.lookup(ip("5.62.1.1"));
    let mut r = rule("no-inference-fr");
    r.workloads = vec![Inference];
    r.deny_client_countries = vec!["FR".into()];
    r.deny_node_countries = vec!["FR".into()];
    let mut cfg = GeofenceConfig::default();
    cfg.rules.push(r);
    let p = Policy::compile(&cfg).unwrap();
    let cpu = p.class_id("cpu");
    assert_allow(&p.check_serve(&fr, &de, cpu, Game));
    assert_deny(
        &p.check_serve(&fr, &de, cpu, Inference),
        "no-inference-fr",
        Side::Client,
    );
    assert_allow(&p.check_serve(&de, &fr, cpu, Game));
    assert_deny(
        &p.check_serve(&de, &fr, cpu, Inference),
        "no-inference-fr",
        Side::Node,
    );
    // A node is not onboarded for one workload: the rule is enforced when serving.
    assert_allow(&p.check_onboard(&fr, cpu));
    assert_eq!(
        p.check_serve(&fr, &de, cpu, Inference).facts().workload,
        Some(Inference)
    );
    assert_eq!(p.check_onboard(&fr, cpu).facts().workload, None);

    // A rule listing both kinds applies to onboarding too.
    let mut both = rule("no-fr-nodes");
    both.workloads = vec![Game, Inference];
    both.deny_node_countries = vec!["FR".into()];
    let mut cfg = GeofenceConfig::default();
    cfg.rules.push(both);
    let p = Policy::compile(&cfg).unwrap();
    assert_deny(&p.check_onboard(&fr, cpu), "no-fr-nodes", Side::Node);
}

#[test]
fn rules_run_in_order_first_deny_wins_disabled_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let kp = db.lookup(ip("175.45.176.1"));
    let us = db.lookup(ip("8.8.8.8"));
    let p = default_policy();
    let h100 = p.class_id("h100");
    // KP is in both @ofac and @export_controlled: the first rule reports.
    assert_deny(
        &p.check_serve(&kp, &us, h100, Game),
        "sanctions",
        Side::Client,
    );
    let mut cfg = GeofenceConfig::default();
    cfg.rules.swap(0, 1);
    let p = Policy::compile(&cfg).unwrap();
    assert_deny(
        &p.check_serve(&kp, &us, h100, Game),
        "export-control",
        Side::Client,
    );
    // Sanctions off: an uncontrolled class is allowed for KP.
    let mut cfg = GeofenceConfig::default();
    cfg.rules[0].enabled = false;
    let p = Policy::compile(&cfg).unwrap();
    assert_allow(&p.check_serve(&kp, &us, p.class_id("cpu"), Game));
    assert_deny(
        &p.check_serve(&kp, &us, p.class_id("h100"), Game),
        "export-control",
        Side::Client,
    );
    // Operator-defined sets referring to defaults.
    let mut cfg = GeofenceConfig::default();
    cfg.country_sets
        .insert("partners".into(), vec!["@eu".into(), "US".into()]);
    let mut r = rule("partners-only-h200");
    r.gpu_classes = vec!["h200".into()];
    r.residency_client_countries = vec!["@partners".into()];
    r.residency_node_countries = vec!["@partners".into()];
    cfg.rules.push(r);
    let p = Policy::compile(&cfg).unwrap();
    let kyiv = db.lookup(ip("31.128.1.1"));
    let de = db.lookup(ip("5.62.1.1"));
    let h200 = p.class_id("h200");
    assert_deny(
        &p.check_serve(&us, &kyiv, h200, Game),
        "partners-only-h200",
        Side::Pair,
    );
    assert_allow(&p.check_serve(&us, &de, h200, Game));
    assert_allow(&p.check_serve(&us, &kyiv, p.class_id("h100"), Game));
}

#[test]
fn facts_record_what_was_used() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let p = default_policy();
    let crimea = db.lookup(ip("176.104.40.1"));
    let de = db.lookup(ip("5.62.1.1"));
    let h100 = p.class_id("h100");
    let d = p.check_serve(&crimea, &de, h100, Inference);
    let f = d.facts();
    assert_eq!(f.client_country.unwrap().as_str(), "UA");
    assert_eq!(f.client_subdivision.unwrap().as_str(), "UA-43");
    assert_eq!(f.node_country.unwrap().as_str(), "DE");
    assert_eq!(f.node_subdivision, None);
    assert_eq!(f.class, h100);
    assert!(f.controlled);
    assert_eq!(f.workload, Some(Inference));
    let allow = p.check_serve(&de, &de, ClassId::OTHER, Game);
    assert_allow(&allow);
    assert!(!allow.facts().controlled);
    assert_eq!(allow.facts().class, ClassId::OTHER);
}

#[test]
fn lookup_report_shape_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let p = default_policy();
    let classes: Vec<String> = ["h100", "rtx3080"].iter().map(|s| s.to_string()).collect();

    let cn = lookup_report(&db, &p, ip("114.114.114.114"), &classes);
    assert_eq!(cn["ip"], "114.114.114.114");
    assert_eq!(cn["country"], "CN");
    assert_eq!(cn["continent"], "AS");
    assert_eq!(cn["source"]["country"], "database");
    assert_eq!(cn["source"]["coords"], "database");
    assert!(cn["lat"].is_f64() && cn["lon"].is_f64());
    assert_eq!(cn["accuracy_km"], 100);
    assert_eq!(cn["anonymous"]["tor_exit_node"], false);
    let h = &cn["decisions"]["h100"];
    assert_eq!(h["controlled"], true);
    assert_eq!(h["serve"]["allowed"], false);
    assert_eq!(h["serve"]["rule"], "export-control");
    assert_eq!(h["serve"]["side"], "client");
    assert_eq!(h["serve"]["by_workload"]["inference"]["allowed"], false);
    assert_eq!(h["onboard"]["allowed"], false);
    assert_eq!(h["onboard"]["rule"], "export-control");
    let r = &cn["decisions"]["rtx3080"];
    assert_eq!(r["serve"]["allowed"], true);
    assert_eq!(r["serve"]["rule"], serde_json::Value::Null);
    assert_eq!(r["onboard"]["allowed"], true);

    let unknown = lookup_report(&db, &p, ip("127.0.0.1"), &classes);
    assert_eq!(unknown["country"], serde_json::Value::Null);
    assert_eq!(unknown["lat"], serde_json::Value::Null);
    assert_eq!(unknown["source"]["country"], "none");
    assert_eq!(
        unknown["decisions"]["h100"]["serve"]["rule"],
        "unknown-location"
    );
    assert_eq!(unknown["decisions"]["rtx3080"]["serve"]["allowed"], true);

    // A workload-limited rule: serve is denied, by_workload shows which kind.
    let mut r = rule("no-inference-cn");
    r.workloads = vec![Inference];
    r.deny_client_countries = vec!["CN".into()];
    let mut cfg = GeofenceConfig::default();
    cfg.rules.push(r);
    let p = Policy::compile(&cfg).unwrap();
    let cn = lookup_report(&db, &p, ip("::ffff:114.114.114.114"), &classes);
    let r = &cn["decisions"]["rtx3080"]["serve"];
    assert_eq!(r["allowed"], false);
    assert_eq!(r["rule"], "no-inference-cn");
    assert_eq!(r["by_workload"]["game"]["allowed"], true);
    assert_eq!(r["by_workload"]["inference"]["allowed"], false);
}

#[test]
fn sanctions_see_through_ipv6_addresses_that_embed_a_sanctioned_ipv4() {
    // 6to4, Teredo and NAT64 spellings of 175.45.176.1 (KP), as a client and as a node, through
    // the embedded database and through a City database; and in the `geo lookup` report.
    let dir = tempfile::tempdir().unwrap();
    let p = default_policy();
    for db in [GeoDb::embedded().unwrap(), world_db(dir.path())] {
        let us = db.lookup(ip("8.8.8.8"));
        for addr in [
            "2002:af2d:b001::1",
            "2001:0:4136:e378:8000:0:50d2:4ffe",
            "64:ff9b::af2d:b001",
            "::175.45.176.1",
        ] {
            let kp = db.lookup(ip(addr));
            for class in CLASSES {
                let id = p.class_id(class);
                assert_deny(
                    &p.check_serve(&kp, &us, id, Game),
                    "sanctions",
                    Side::Client,
                );
                assert_deny(&p.check_onboard(&kp, id), "sanctions", Side::Node);
            }
            let report = lookup_report(&db, &p, ip(addr), &["cpu".to_string()]);
            assert_eq!(report["country"], "KP", "{report}");
            assert_eq!(report["embedded"]["ipv4"], "175.45.176.1", "{report}");
            assert_eq!(report["decisions"]["cpu"]["serve"]["rule"], "sanctions");
        }
        let report = lookup_report(&db, &p, ip("2002:af2d:b001::1"), &[]);
        assert_eq!(report["embedded"]["kind"], "6to4");
        let report = lookup_report(&db, &p, ip("8.8.8.8"), &[]);
        assert!(report["embedded"].is_null(), "{report}");
    }
}

#[test]
fn a_sanctions_rule_with_unknown_location_deny_refuses_unknown_clients_and_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let db = world_db(dir.path());
    let us = db.lookup(ip("8.8.8.8"));
    let unknown = db.lookup(ip("10.1.2.3"));
    assert!(unknown.is_unknown());
    let cpu = |p: &Policy| p.class_id("cpu");
    // The default: unknown locations take no part in the sanctions rule, and the uncontrolled
    // unknown-location policy (allow) serves them.
    let p = default_policy();
    assert_allow(&p.check_serve(&unknown, &us, cpu(&p), Game));
    assert_allow(&p.check_onboard(&unknown, cpu(&p)));
    // With `unknown_location = "deny"` on the sanctions rule, the rule itself refuses them,
    // under its own name, for every class, while known places are unaffected.
    let mut cfg = GeofenceConfig::default();
    cfg.rules[0].unknown_location = UnknownPolicy::Deny;
    let p = Policy::compile(&cfg).unwrap();
    for class in CLASSES {
        let id = p.class_id(class);
        let d = p.check_serve(&unknown, &us, id, Inference);
        assert_deny(&d, "sanctions", Side::Client);
        assert!(
            d.reason().unwrap().contains("could not be determined"),
            "{d:?}"
        );
        assert_deny(
            &p.check_serve(&us, &unknown, id, Game),
            "sanctions",
            Side::Node,
        );
        assert_deny(&p.check_onboard(&unknown, id), "sanctions", Side::Node);
        assert_deny(
            &p.check_client(&unknown, id, Game),
            "sanctions",
            Side::Client,
        );
    }
    assert_allow(&p.check_serve(&us, &us, cpu(&p), Game));
    assert_allow(&p.check_onboard(&us, cpu(&p)));
}
