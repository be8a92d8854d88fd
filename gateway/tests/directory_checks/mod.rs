//! The directory checks over any `Store` (issue 13), shared by `gateway/tests/store_directory.rs`
//! (SQLite) and the PostgreSQL runs in `tests/` (through `#[path]`, with the PostgreSQL harness).

#![allow(dead_code)]

use nearpath_gateway::store::{GatewayRecord, NodeDirEntry, Store, StoreError};

pub const PIN_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
pub const PIN_B: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub fn gw(id: &str, pin: &str, now_ms: u64, lease_ms: u64) -> GatewayRecord {
    GatewayRecord {
        id: id.into(),
        region: "eu-central".into(),
        lat: 50.1,
        lon: 8.7,
        quic_address: "127.0.0.1:4433".into(),
        http_url: "http://127.0.0.1:8080".into(),
        cert_sha256: pin.into(),
        version: "0.1.0".into(),
        started_at_ms: 1_000,
        heartbeat_at_ms: now_ms,
        expires_at_ms: now_ms + lease_ms,
    }
}

pub fn node(id: &str, gateway: &str, at_ms: u64) -> NodeDirEntry {
    NodeDirEntry {
        node_id: id.into(),
        operator_id: "op_1".into(),
        gateway_id: gateway.into(),
        country: Some("DE".into()),
        lat: Some(50.0),
        lon: Some(8.0),
        gpu_classes: vec!["h100".into()],
        models: vec!["llama-3-8b".into()],
        games: vec!["arena".into()],
        inference_slots: 4,
        inference_free: 3,
        game_slots: 2,
        game_free: 2,
        accepting: true,
        verification: "unverified".into(),
        updated_at_ms: at_ms,
        encoders: Vec::new(),
        model_caps: Vec::new(),
        subdivision: None,
    }
}

pub fn ids(nodes: &[NodeDirEntry]) -> Vec<(String, String)> {
    nodes
        .iter()
        .map(|n| (n.node_id.clone(), n.gateway_id.clone()))
        .collect()
}

pub fn pair(n: &str, g: &str) -> (String, String) {
    (n.to_string(), g.to_string())
}

// ---------------------------------------------------------------------------------------------
// The checks, over any store.

pub fn heartbeats_renew_and_expired_leases_stay_listed_as_expired(store: &dyn Store) {
    store
        .gateway_heartbeat(&gw("eu-1", PIN_A, 10_000, 3_000))
        .expect("heartbeat eu-1");
    store
        .gateway_heartbeat(&gw("us-1", PIN_B, 10_000, 3_000))
        .expect("heartbeat us-1");
    // eu-1 renews; us-1 falls silent.
    store
        .gateway_heartbeat(&gw("eu-1", PIN_A, 12_000, 3_000))
        .expect("renew eu-1");
    let list = store.list_gateways().expect("list");
    assert_eq!(
        list.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        ["eu-1", "us-1"]
    );
    assert_eq!(
        list[0],
        gw("eu-1", PIN_A, 12_000, 3_000),
        "every field round-trips"
    );
    let now = 13_000;
    assert!(list[0].is_live(now), "renewed at 12 s, lease to 15 s");
    assert!(
        !list[1].is_live(now),
        "last renewed at 10 s: its lease ended at 13 s"
    );
}

pub fn a_live_holder_of_the_id_with_another_pin_refuses_the_join(store: &dyn Store) {
    assert_eq!(
        store
            .gateway_join(&gw("eu-1", PIN_A, 10_000, 3_000), 10_000)
            .expect("join"),
        None
    );
    // The same gateway (same pin) restarting takes its entry back at once.
    assert_eq!(
        store
            .gateway_join(&gw("eu-1", PIN_A, 11_000, 3_000), 11_000)
            .expect("rejoin"),
        None
    );
    // Another gateway configured with the same id is refused while the lease holds...
    let holder = store
        .gateway_join(&gw("eu-1", PIN_B, 12_000, 3_000), 12_000)
        .expect("join with another pin")
        .expect("refused: the live holder is returned");
    assert_eq!(holder.cert_sha256, PIN_A);
    assert_eq!(
        store.list_gateways().expect("list")[0].cert_sha256,
        PIN_A,
        "nothing written"
    );
    // ...and takes the id once the lease expired (the holder died).
    assert_eq!(
        store
            .gateway_join(&gw("eu-1", PIN_B, 14_000, 3_000), 14_000)
            .expect("join"),
        None
    );
    assert_eq!(store.list_gateways().expect("list")[0].cert_sha256, PIN_B);
}

pub fn publishing_replaces_the_gateways_whole_set(store: &dyn Store) {
    store
        .publish_nodes("eu-1", &[node("n1", "eu-1", 100), node("n2", "eu-1", 100)])
        .expect("publish");
    store
        .publish_nodes("us-1", &[node("n9", "us-1", 100)])
        .expect("publish us");
    let mut n2 = node("n2", "eu-1", 200);
    n2.inference_free = 0;
    n2.accepting = false;
    store
        .publish_nodes("eu-1", &[n2.clone(), node("n3", "eu-1", 200)])
        .expect("republish");
    let dir = store.list_node_directory().expect("list");
    assert_eq!(
        ids(&dir),
        [pair("n2", "eu-1"), pair("n3", "eu-1"), pair("n9", "us-1")],
        "n1 left eu-1; us-1's set is untouched"
    );
    assert_eq!(dir[0], n2, "every field round-trips");
    store.publish_nodes("eu-1", &[]).expect("publish nothing");
    assert_eq!(
        ids(&store.list_node_directory().expect("list")),
        [pair("n9", "us-1")]
    );
}

pub fn a_node_that_moved_keeps_the_newer_entry(store: &dyn Store) {
    store
        .publish_nodes("eu-1", &[node("n1", "eu-1", 100)])
        .expect("publish");
    // n1 reconnected to us-1, which publishes it later.
    store
        .publish_nodes("us-1", &[node("n1", "us-1", 200)])
        .expect("publish");
    assert_eq!(
        ids(&store.list_node_directory().expect("list")),
        [pair("n1", "us-1")]
    );
    // eu-1's older view (published late) does not take it back...
    store
        .publish_nodes("eu-1", &[node("n1", "eu-1", 150)])
        .expect("stale publish");
    assert_eq!(
        ids(&store.list_node_directory().expect("list")),
        [pair("n1", "us-1")]
    );
    // ...nor does eu-1 removing it from its own set remove us-1's entry.
    store.publish_nodes("eu-1", &[]).expect("publish");
    assert_eq!(
        ids(&store.list_node_directory().expect("list")),
        [pair("n1", "us-1")]
    );
    // Leaving removes the gateway and its nodes, nobody else's.
    store
        .gateway_heartbeat(&gw("us-1", PIN_B, 300, 3_000))
        .expect("heartbeat");
    store
        .publish_nodes("eu-1", &[node("n2", "eu-1", 300)])
        .expect("publish");
    store.gateway_leave("us-1").expect("leave");
    assert!(store.list_gateways().expect("list").is_empty());
    assert_eq!(
        ids(&store.list_node_directory().expect("list")),
        [pair("n2", "eu-1")]
    );
}

fn expect_invalid(what: &str, r: Result<impl std::fmt::Debug, StoreError>) {
    match r {
        Err(StoreError::Invalid { .. }) => {}
        other => panic!("{what}: expected Invalid, got {other:?}"),
    }
}

pub fn hostile_directory_entries_are_refused_with_invalid(store: &dyn Store) {
    let good = gw("eu-1", PIN_A, 10_000, 3_000);
    let bad_gateways: Vec<(&str, GatewayRecord)> = vec![
        (
            "oversize id",
            GatewayRecord {
                id: "g".repeat(65),
                ..good.clone()
            },
        ),
        (
            "empty id",
            GatewayRecord {
                id: String::new(),
                ..good.clone()
            },
        ),
        (
            "id with a slash",
            GatewayRecord {
                id: "eu/1".into(),
                ..good.clone()
            },
        ),
        (
            "oversize region",
            GatewayRecord {
                region: "r".repeat(129),
                ..good.clone()
            },
        ),
        (
            "control in region",
            GatewayRecord {
                region: "eu\n".into(),
                ..good.clone()
            },
        ),
        (
            "oversize address",
            GatewayRecord {
                quic_address: format!("{}:1", "h".repeat(1100)),
                ..good.clone()
            },
        ),
        (
            "empty address",
            GatewayRecord {
                quic_address: String::new(),
                ..good.clone()
            },
        ),
        (
            "url without scheme",
            GatewayRecord {
                http_url: "gw.example.com".into(),
                ..good.clone()
            },
        ),
        (
            "oversize url",
            GatewayRecord {
                http_url: format!("http://{}", "h".repeat(1100)),
                ..good.clone()
            },
        ),
        (
            "short pin",
            GatewayRecord {
                cert_sha256: "abcd".into(),
                ..good.clone()
            },
        ),
        (
            "uppercase pin",
            GatewayRecord {
                cert_sha256: PIN_A.to_uppercase(),
                ..good.clone()
            },
        ),
        (
            "NaN latitude",
            GatewayRecord {
                lat: f64::NAN,
                ..good.clone()
            },
        ),
        (
            "longitude out of range",
            GatewayRecord {
                lon: 181.0,
                ..good.clone()
            },
        ),
        (
            "expiry past i64",
            GatewayRecord {
                expires_at_ms: u64::MAX,
                ..good.clone()
            },
        ),
    ];
    for (what, r) in &bad_gateways {
        expect_invalid(what, store.gateway_heartbeat(r));
        expect_invalid(what, store.gateway_join(r, 10_000));
    }
    assert!(
        store.list_gateways().expect("list").is_empty(),
        "nothing was written"
    );
    expect_invalid(
        "leave with an oversize id",
        store.gateway_leave(&"g".repeat(65)),
    );

    let n = node("n1", "eu-1", 100);
    let bad_nodes: Vec<(&str, NodeDirEntry)> = vec![
        (
            "forged gateway id",
            NodeDirEntry {
                gateway_id: "us-1".into(),
                ..n.clone()
            },
        ),
        (
            "empty node id",
            NodeDirEntry {
                node_id: String::new(),
                ..n.clone()
            },
        ),
        (
            "oversize node id",
            NodeDirEntry {
                node_id: "n".repeat(257),
                ..n.clone()
            },
        ),
        (
            "inflated inference free",
            NodeDirEntry {
                inference_free: 5,
                ..n.clone()
            },
        ),
        (
            "inflated game free",
            NodeDirEntry {
                game_free: u32::MAX,
                ..n.clone()
            },
        ),
        (
            "bad country",
            NodeDirEntry {
                country: Some("Germany".into()),
                ..n.clone()
            },
        ),
        (
            "lat without lon",
            NodeDirEntry {
                lon: None,
                ..n.clone()
            },
        ),
        (
            "infinite lat",
            NodeDirEntry {
                lat: Some(f64::INFINITY),
                ..n.clone()
            },
        ),
        (
            "too many models",
            NodeDirEntry {
                models: (0..257).map(|i| format!("m{i}")).collect(),
                ..n.clone()
            },
        ),
        (
            "oversize model",
            NodeDirEntry {
                models: vec!["m".repeat(257)],
                ..n.clone()
            },
        ),
        (
            "empty game",
            NodeDirEntry {
                games: vec![String::new()],
                ..n.clone()
            },
        ),
        (
            "oversize verification",
            NodeDirEntry {
                verification: "v".repeat(65),
                ..n.clone()
            },
        ),
    ];
    for (what, e) in &bad_nodes {
        expect_invalid(what, store.publish_nodes("eu-1", std::slice::from_ref(e)));
    }
    expect_invalid(
        "a node published twice",
        store.publish_nodes("eu-1", &[n.clone(), n.clone()]),
    );
    expect_invalid(
        "oversize publishing gateway id",
        store.publish_nodes(&"g".repeat(65), &[]),
    );
    // A refused publication changes nothing: the previous set stays.
    store
        .publish_nodes("eu-1", &[node("n7", "eu-1", 100)])
        .expect("publish");
    expect_invalid(
        "mixed",
        store.publish_nodes(
            "eu-1",
            &[
                n.clone(),
                NodeDirEntry {
                    inference_free: 9,
                    ..n
                },
            ],
        ),
    );
    assert_eq!(
        ids(&store.list_node_directory().expect("list")),
        [pair("n7", "eu-1")]
    );
}

fn encoder(codec: &str, implementation: &str) -> nearpath_gateway::store::DirEncoder {
    nearpath_gateway::store::DirEncoder {
        codec: codec.into(),
        implementation: implementation.into(),
    }
}

/// Issue 15's encoders travel through the node directory, and a gateway publishing a node with
/// thousands of encoders or bogus codec names is refused before anything is written (the
/// gateway's earlier publication stands).
pub fn encoders_are_published_and_hostile_encoder_lists_are_refused(store: &dyn Store) {
    use nearpath_protocol::message::VideoCodec;
    let mut hevc = node("hevc-1", "eu-1", 100);
    hevc.encoders = vec![encoder("hevc", "x265"), encoder("h264", "x264")];
    // Model capabilities travel too (tools and logprobs for the node's one model).
    hevc.model_caps = vec![1 | 8];
    let plain = node("plain-1", "eu-1", 100);
    store
        .publish_nodes("eu-1", &[hevc.clone(), plain.clone()])
        .expect("publish");
    let listed = store.list_node_directory().expect("list");
    assert_eq!(listed, [hevc.clone(), plain.clone()]);
    assert!(listed[0].encodes(VideoCodec::Hevc) && !listed[0].encodes(VideoCodec::Av1));
    assert!(listed[1].encodes(VideoCodec::H264) && !listed[1].encodes(VideoCodec::Hevc));

    let hostile: Vec<(&str, Vec<nearpath_gateway::store::DirEncoder>)> = vec![
        (
            "thousands of encoders",
            vec![encoder("hevc", "hevc_nvenc"); 5_000],
        ),
        (
            "17 distinct codecs",
            (0..17).map(|i| encoder(&format!("c{i}"), "x")).collect(),
        ),
        (
            "a codec twice",
            vec![encoder("av1", "libaom"), encoder("av1", "av1_nvenc")],
        ),
        ("an uppercase codec", vec![encoder("HEVC", "x265")]),
        (
            "SQL in a codec",
            vec![encoder("h264'); DROP TABLE node_directory;--", "x")],
        ),
        ("an empty codec", vec![encoder("", "x")]),
        ("an oversize codec", vec![encoder(&"a".repeat(17), "x")]),
        (
            "an oversize implementation",
            vec![encoder("h264", &"x".repeat(33))],
        ),
        ("a control character", vec![encoder("h264", "x264\n")]),
    ];
    for (what, encoders) in hostile {
        let mut n = node("evil-1", "eu-1", 200);
        n.encoders = encoders;
        expect_invalid(what, store.publish_nodes("eu-1", &[hevc.clone(), n]));
    }
    let mut n = node("evil-1", "eu-1", 200);
    n.model_caps = vec![1; 5_000];
    expect_invalid(
        "more capability sets than models",
        store.publish_nodes("eu-1", &[hevc.clone(), n]),
    );
    assert_eq!(
        store.list_node_directory().expect("list"),
        [hevc, plain],
        "a refused publication changes nothing"
    );
}

/// Each node's ISO 3166-2 subdivision travels through the node directory (issue 13: geofence
/// rules naming a subdivision judge remote nodes by it), and a gateway publishing one that does
/// not belong to the node's country, or is no subdivision at all, is refused before anything
/// is written.
pub fn subdivisions_are_published_and_forged_ones_refused(store: &dyn Store) {
    let mut crimea = node("ua-1", "eu-1", 100);
    crimea.country = Some("UA".into());
    crimea.subdivision = Some("UA-43".into());
    let plain = node("ua-2", "eu-1", 100);
    store
        .publish_nodes("eu-1", &[crimea.clone(), plain.clone()])
        .expect("publish");
    let listed = store.list_node_directory().expect("list");
    assert_eq!(listed, [crimea.clone(), plain.clone()]);
    assert_eq!(listed[0].subdivision.as_deref(), Some("UA-43"));
    assert_eq!(listed[1].subdivision, None);

    let hostile: Vec<(&str, Option<&str>, String)> = vec![
        ("another country's subdivision", Some("PL"), "UA-43".into()),
        ("a subdivision without a country", None, "UA-43".into()),
        ("lower case", Some("UA"), "ua-43".into()),
        ("no code after the hyphen", Some("UA"), "UA-".into()),
        (
            "four characters after the hyphen",
            Some("UA"),
            "UA-4300".into(),
        ),
        ("no hyphen", Some("UA"), "UA43".into()),
        ("a control character", Some("UA"), "UA-4\n".into()),
        (
            "SQL",
            Some("UA"),
            "UA-43'); DROP TABLE node_directory;--".into(),
        ),
        (
            "an oversize value",
            Some("UA"),
            format!("UA-{}", "4".repeat(100_000)),
        ),
        ("an empty value", Some("UA"), String::new()),
    ];
    for (what, country, subdivision) in hostile {
        let mut n = node("evil-1", "eu-1", 200);
        n.country = country.map(str::to_string);
        n.subdivision = Some(subdivision);
        expect_invalid(what, store.publish_nodes("eu-1", &[crimea.clone(), n]));
    }
    assert_eq!(
        store.list_node_directory().expect("list"),
        [crimea, plain],
        "a refused publication changes nothing"
    );
}
