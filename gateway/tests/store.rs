//! Tests of the durable store (`nearpath_gateway::store`) through its public API, including a
//! kill -9 durability test that re-runs this test binary as a child process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use nearpath_gateway::store::{
    hash_secret, KycStatus, PgStore, SlaDelta, SqliteStore, Store, StoreError, UsageKind,
    UsageRecord, UsageTotals, SCHEMA_VERSION,
};

// The throwaway PostgreSQL server of the end-to-end tests, included by path: a dependency on
// `nearpath-tests` would be circular (it depends on this crate).
#[path = "../../tests/src/pg.rs"]
#[allow(dead_code)]
mod pg;

/// A fresh database on this binary's PostgreSQL server, or `None` (after printing why) when
/// PostgreSQL is not installed and `CI` is not set.
fn pg_url(test: &str) -> Option<String> {
    pg::PgServer::shared().map(|server| server.new_database(test))
}

fn pg_open(url: &str) -> PgStore {
    PgStore::open(url, 4, Duration::from_secs(20)).expect("open PostgreSQL store")
}

/// A PostgreSQL store on a fresh database (see [`pg_url`]).
fn pg_store(test: &str) -> Option<Arc<dyn Store>> {
    pg_url(test).map(|url| Arc::new(pg_open(&url)) as Arc<dyn Store>)
}

/// Runs each named behaviour test (a `fn(Arc<dyn Store>)`) against both stores.
macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite_suite {
            $(
                #[test]
                fn $name() {
                    super::$name(super::mem())
                }
            )*
        }
        mod pg_suite {
            $(
                #[test]
                fn $name() {
                    if let Some(store) = super::pg_store(stringify!($name)) {
                        super::$name(store)
                    }
                }
            )*
        }
    };
}

fn mem() -> Arc<dyn Store> {
    Arc::new(SqliteStore::open_in_memory().expect("open in-memory store"))
}

// The behaviour suite: each of these tests runs against SQLite (`sqlite_suite::`) and against
// PostgreSQL (`pg_suite::`, on the throwaway server of `nearpath_tests::pg`, a database per
// test), so that the two stores keep one set of semantics.
store_suite!(
    operators_are_created_listed_and_validated,
    kyc_transitions_are_stored_and_seen_by_token_authentication,
    enrolment_tokens_authenticate_until_revoked,
    api_keys_authenticate_until_revoked_and_fixed_secrets_are_idempotent,
    an_api_key_is_found_by_id_until_revoked_and_hostile_ids_find_nothing,
    sla_records_accumulate,
    penalties_are_listed_counted_and_bump_the_sla_record,
    node_ids_belong_to_their_first_operator_forever,
    sla_records_and_penalties_are_kept_per_operator,
    gpu_models_are_noted_while_unclassified_and_classified_by_admins,
    usage_is_listed_and_summed,
    invalid_usage_is_refused_before_reaching_the_ledger,
    hostile_names_and_ids_are_refused_naming_the_field,
    key_usage_is_summed_by_key_utc_day_and_model_over_inference_records_only,
    a_key_policy_round_trips_and_bad_values_are_refused_naming_the_field,
    sessions_directory_keeps_one_entry_per_session_id_across_the_u64_range,
    the_federation_secret_is_created_once_and_shared,
    check_records_list_newest_first_and_each_gateway_keeps_its_newest_vote,
    check_records_are_capped_per_node_and_the_cap_never_drops_a_vote,
    hostile_check_records_and_verifications_are_refused_naming_the_field,
    a_changed_gpu_set_is_detected_across_records,
    a_gpu_uuid_held_by_two_live_nodes_is_found_for_both,
    a_released_gpu_set_is_no_longer_live_but_is_remembered,
    gpu_reports_over_the_limits_are_refused_and_leave_the_set_unchanged,
    a_verification_snapshot_is_replaced_only_by_a_newer_one,
);

fn usage(n: u64, tenant: &str, node: &str, outcome: &str) -> UsageRecord {
    // Every third record is a game session (frames, no tokens); the rest are inference requests.
    let game = matches!(n % 3, 0);
    UsageRecord {
        id: None,
        at_ms: 1_700_000_000_000 + n * 10,
        kind: if game {
            UsageKind::Game
        } else {
            UsageKind::Inference
        },
        request_id: format!("req-{n}"),
        tenant: tenant.to_owned(),
        api_key_id: format!("key_{tenant}"),
        node_id: node.to_owned(),
        operator_id: if node.is_empty() {
            String::new()
        } else {
            format!("op_{node}")
        },
        workload: if game { "doom" } else { "llama-3-8b" }.to_owned(),
        outcome: outcome.to_owned(),
        prompt_tokens: if game { 0 } else { n * 7 % 101 },
        completion_tokens: if game { 0 } else { n * 13 % 211 },
        node_prompt_tokens: (!game).then_some(n * 7 % 101),
        node_completion_tokens: (!game).then_some(u64::from(u32::MAX) + n),
        ttft_ms: (!game).then_some(n as f64 * 0.25),
        duration_ms: 10.0 + n as f64,
        gpu_seconds: n as f64 * 0.125,
        frames: if game { n * 60 } else { 0 },
        bytes: n * 1000 + 1,
    }
}

// ---------------------------------------------------------------------------------------------
// Operators and KYC

fn operators_are_created_listed_and_validated(store: Arc<dyn Store>) {
    let a = store
        .create_operator("  Acme GPUs  ", KycStatus::Pending)
        .expect("create a");
    let b = store
        .create_operator(&"é".repeat(128), KycStatus::Verified)
        .expect("128 characters is allowed even when they are multi-byte");
    assert_eq!(a.name, "Acme GPUs", "names are trimmed");
    assert!(a.id.starts_with("op_") && a.id.len() == 19, "{}", a.id);
    assert_ne!(a.id, b.id);
    assert_eq!(a.created_at_ms, a.updated_at_ms);
    assert_eq!(store.get_operator(&a.id).expect("get"), Some(a.clone()));
    assert_eq!(store.get_operator("op_missing").expect("get"), None);
    assert_eq!(store.list_operators().expect("list"), vec![a, b]);

    for bad in ["", "   ", &"x".repeat(129), "tab\tinside"] {
        match store.create_operator(bad, KycStatus::Pending) {
            Err(StoreError::Invalid { field: "name", .. }) => {}
            other => panic!("name {bad:?}: expected Invalid, got {other:?}"),
        }
    }
    assert_eq!(store.list_operators().expect("list").len(), 2);
}

fn kyc_transitions_are_stored_and_seen_by_token_authentication(store: Arc<dyn Store>) {
    let op = store
        .create_operator("Node Co", KycStatus::Pending)
        .expect("create");
    let (_, secret) = store.create_enrolment_token(&op.id).expect("token");
    let status_via_token = |store: &Arc<dyn Store>| {
        store
            .authenticate_enrolment_token(&secret)
            .expect("auth")
            .map(|(o, _)| o.kyc_status)
    };
    assert_eq!(status_via_token(&store), Some(KycStatus::Pending));
    for status in [
        KycStatus::Verified,
        KycStatus::Suspended,
        KycStatus::Verified,
        KycStatus::Pending,
    ] {
        let updated = store.set_operator_kyc(&op.id, status).expect("set");
        assert_eq!(updated.kyc_status, status);
        assert_eq!(updated.created_at_ms, op.created_at_ms);
        assert!(updated.updated_at_ms >= op.created_at_ms);
        assert_eq!(
            store
                .get_operator(&op.id)
                .expect("get")
                .map(|o| o.kyc_status),
            Some(status)
        );
        assert_eq!(status_via_token(&store), Some(status));
    }
    match store.set_operator_kyc("op_nobody", KycStatus::Verified) {
        Err(StoreError::NotFound { kind, id }) => {
            assert_eq!(kind, "operator");
            assert_eq!(id, "op_nobody");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Enrolment tokens and API keys

fn enrolment_tokens_authenticate_until_revoked(store: Arc<dyn Store>) {
    let op = store
        .create_operator("Op", KycStatus::Verified)
        .expect("create");
    let other = store
        .create_operator("Other", KycStatus::Verified)
        .expect("create");
    let (t1, s1) = store.create_enrolment_token(&op.id).expect("t1");
    let (t2, s2) = store.create_enrolment_token(&op.id).expect("t2");
    let (t3, _) = store.create_enrolment_token(&other.id).expect("t3");

    assert!(s1.starts_with("npt_") && s1.len() == 68, "{s1}");
    assert!(s1[4..].chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(s1, s2);
    assert_eq!(t1.prefix, s1[..8]);
    assert!(t1.id.starts_with("tok_"));
    assert_eq!(t1.operator_id, op.id);
    assert!(!t1.revoked);

    let (found_op, found_tok) = store
        .authenticate_enrolment_token(&s1)
        .expect("auth")
        .expect("valid token authenticates");
    assert_eq!(found_op, op);
    assert_eq!(found_tok, t1);
    assert_eq!(
        store
            .authenticate_enrolment_token(&s1.replace("npt_", "npx_"))
            .expect("auth"),
        None
    );
    assert_eq!(store.authenticate_enrolment_token("").expect("auth"), None);
    assert_eq!(
        store
            .authenticate_enrolment_token(&"a".repeat(10_000))
            .expect("over-long secrets are simply unknown"),
        None
    );

    store.revoke_enrolment_token(&t1.id).expect("revoke");
    store
        .revoke_enrolment_token(&t1.id)
        .expect("revoking twice is fine");
    assert_eq!(store.authenticate_enrolment_token(&s1).expect("auth"), None);
    assert!(store
        .authenticate_enrolment_token(&s2)
        .expect("auth")
        .is_some());

    let listed = store.list_enrolment_tokens(&op.id).expect("list");
    let revoked_t1 = EnrolmentTokenView::from(&t1, true);
    assert_eq!(
        listed
            .iter()
            .map(|t| EnrolmentTokenView::from(t, t.revoked))
            .collect::<Vec<_>>(),
        vec![revoked_t1, EnrolmentTokenView::from(&t2, false)]
    );
    assert_eq!(
        store.list_enrolment_tokens(&other.id).expect("list"),
        vec![t3]
    );

    assert!(matches!(
        store.create_enrolment_token("op_nobody"),
        Err(StoreError::NotFound {
            kind: "operator",
            ..
        })
    ));
    assert!(matches!(
        store.list_enrolment_tokens("op_nobody"),
        Err(StoreError::NotFound {
            kind: "operator",
            ..
        })
    ));
    assert!(matches!(
        store.revoke_enrolment_token("tok_nobody"),
        Err(StoreError::NotFound {
            kind: "enrolment_token",
            ..
        })
    ));
}

/// The parts of a token that a listing must reproduce, with the revocation state made explicit.
#[derive(Debug, PartialEq)]
struct EnrolmentTokenView {
    id: String,
    operator_id: String,
    prefix: String,
    created_at_ms: u64,
    revoked: bool,
}

impl EnrolmentTokenView {
    fn from(t: &nearpath_gateway::store::EnrolmentToken, revoked: bool) -> Self {
        EnrolmentTokenView {
            id: t.id.clone(),
            operator_id: t.operator_id.clone(),
            prefix: t.prefix.clone(),
            created_at_ms: t.created_at_ms,
            revoked,
        }
    }
}

fn api_keys_authenticate_until_revoked_and_fixed_secrets_are_idempotent(store: Arc<dyn Store>) {
    let (k1, s1) = store.create_api_key("acme", 60, 10_000).expect("k1");
    let (k2, s2) = store.create_api_key("beta", 5, 500).expect("k2");
    assert!(s1.starts_with("npk_") && s1.len() == 68, "{s1}");
    assert!(k1.id.starts_with("key_"));
    assert_eq!(k1.prefix, s1[..8]);
    assert_eq!(
        (
            k1.tenant.as_str(),
            k1.requests_per_minute,
            k1.tokens_per_minute,
            k1.revoked
        ),
        ("acme", 60, 10_000, false)
    );
    assert_eq!(
        store.authenticate_api_key(&s1).expect("auth"),
        Some(k1.clone())
    );
    assert_eq!(
        store.authenticate_api_key(&s2).expect("auth"),
        Some(k2.clone())
    );
    assert_eq!(store.authenticate_api_key("npk_nope").expect("auth"), None);

    let demo = store
        .insert_api_key_secret("demo", "demo", 600, 100_000)
        .expect("demo");
    let again = store
        .insert_api_key_secret("demo", "someone-else", 1, 1)
        .expect("demo again");
    assert_eq!(again, demo, "the existing key comes back unchanged");
    assert_eq!(demo.prefix, "d", "a short secret is never displayed whole");
    assert_eq!(
        store.authenticate_api_key("demo").expect("auth"),
        Some(demo.clone())
    );

    store.revoke_api_key(&k1.id).expect("revoke");
    store.revoke_api_key(&k1.id).expect("revoke twice");
    assert_eq!(store.authenticate_api_key(&s1).expect("auth"), None);
    assert_eq!(
        store.authenticate_api_key(&s2).expect("auth"),
        Some(k2.clone())
    );

    let listed = store.list_api_keys().expect("list");
    let mut k1_revoked = k1.clone();
    k1_revoked.revoked = true;
    assert_eq!(listed, vec![k1_revoked, k2, demo]);

    assert!(matches!(
        store.revoke_api_key("key_nobody"),
        Err(StoreError::NotFound {
            kind: "api_key",
            ..
        })
    ));
    assert!(matches!(
        store.create_api_key("", 1, 1),
        Err(StoreError::Invalid {
            field: "tenant",
            ..
        })
    ));
    for bad in ["", "has space", &"x".repeat(513)] {
        assert!(
            matches!(
                store.insert_api_key_secret(bad, "t", 1, 1),
                Err(StoreError::Invalid {
                    field: "secret",
                    ..
                })
            ),
            "{bad:?}"
        );
    }
}

/// `api_key_by_id` serves a redirect ticket, whose key id came over the network: it finds the
/// one key, live, and nothing (without an error) for anything else.
fn an_api_key_is_found_by_id_until_revoked_and_hostile_ids_find_nothing(store: Arc<dyn Store>) {
    let (k1, _) = store.create_api_key("acme", 60, 10_000).expect("k1");
    let (k2, _) = store.create_api_key("beta", 5, 500).expect("k2");
    let mut k2 = store
        .update_api_key(
            &k2.id,
            nearpath_gateway::store::ApiKeyUpdate {
                max_concurrent_streams: Some(Some(3)),
                allowed_models: Some(vec!["org/*".into()]),
                expires_at_ms: Some(Some(1_900_000_000_000)),
                ..Default::default()
            },
        )
        .expect("policy");
    // Found: the whole key, caps and policy included, exactly as listed.
    assert_eq!(store.api_key_by_id(&k1.id).expect("k1"), Some(k1.clone()));
    assert_eq!(store.api_key_by_id(&k2.id).expect("k2"), Some(k2.clone()));
    assert!(store.list_api_keys().expect("list").contains(&k2));

    // Absent: an id of the right shape that no key has, and a prefix of a real one.
    assert_eq!(
        store.api_key_by_id("key_0000000000000000").expect("absent"),
        None
    );
    assert_eq!(
        store
            .api_key_by_id(&k1.id[..k1.id.len() - 1])
            .expect("prefix"),
        None
    );
    assert_eq!(
        store.api_key_by_id(&k1.id.to_uppercase()).expect("case"),
        None
    );

    // Revoked: not found, as `authenticate_api_key` does not find it; the other key still is.
    store.revoke_api_key(&k2.id).expect("revoke");
    assert_eq!(store.api_key_by_id(&k2.id).expect("revoked"), None);
    assert_eq!(store.api_key_by_id(&k1.id).expect("k1"), Some(k1.clone()));
    k2.revoked = true;
    assert!(
        store.list_api_keys().expect("list").contains(&k2),
        "still listed"
    );

    // Hostile ids: nothing found, no error, and nothing changed.
    let huge = "k".repeat(10 * 1024 * 1024);
    let at_limit = format!("key_{}", "é".repeat(252));
    let hostile = [
        "",
        huge.as_str(),
        at_limit.as_str(),
        "ключ_日本語_\u{1F600}",
        "key_\u{202E}fdcba",
        "key_\0",
        "\0",
        "key_x' OR '1'='1",
        "' OR 1=1; DROP TABLE api_keys; --",
        "key_%",
        "%",
        "_",
        "*",
        "\\",
        "key_\"quoted\"",
        "$1",
        "?1",
    ];
    for id in hostile {
        match store.api_key_by_id(id) {
            Ok(None) => {}
            other => panic!(
                "id {:?}: {other:?}",
                id.chars().take(40).collect::<String>()
            ),
        }
    }
    let mut listed = store.list_api_keys().expect("list");
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    let mut want = vec![k1.clone(), k2];
    want.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(listed, want, "the hostile lookups changed nothing");
    assert_eq!(store.api_key_by_id(&k1.id).expect("k1"), Some(k1));
}

/// Every byte of every table, as text, read with a connection of our own.
fn dump_tables(path: &Path) -> String {
    let conn = rusqlite::Connection::open(path).expect("raw open");
    let mut out = String::new();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    for table in tables {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\""))
            .expect("prepare");
        let cols = stmt.column_count();
        let mut rows = stmt.query([]).expect("query");
        while let Some(row) = rows.next().expect("row") {
            for i in 0..cols {
                let v: rusqlite::types::Value = row.get(i).expect("value");
                out.push_str(&format!("{table}.{i}={v:?}\n"));
            }
        }
    }
    out
}

#[test]
fn secrets_are_stored_only_as_sha256_digests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    let store = SqliteStore::open(&path).expect("open");
    let op = store
        .create_operator("Op", KycStatus::Verified)
        .expect("create");
    let (_, token_secret) = store.create_enrolment_token(&op.id).expect("token");
    let (_, key_secret) = store.create_api_key("acme", 1, 1).expect("key");
    let fixed = "fixed-demo-secret-0123456789";
    store
        .insert_api_key_secret(fixed, "demo", 1, 1)
        .expect("fixed");

    let tables = dump_tables(&path);
    for secret in [&token_secret, &key_secret, &fixed.to_owned()] {
        assert!(
            tables.contains(&hash_secret(secret)),
            "the digest is stored (so the dump is complete)"
        );
        assert!(
            !tables.contains(secret.as_str()),
            "secret {secret} in tables"
        );
    }
    drop(store);
    // Nor anywhere in the files: database, WAL or journal, whatever is left after closing.
    for entry in std::fs::read_dir(dir.path()).expect("read dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        for secret in [&token_secret, &key_secret, &fixed.to_owned()] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "secret {secret} found in a database file"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SLA and penalties

fn sla_records_accumulate(store: Arc<dyn Store>) {
    assert_eq!(store.sla_get("op_1", "node-a").expect("get"), None);
    let first = store
        .sla_apply(
            "node-a",
            "op_1",
            SlaDelta {
                registrations: 1,
                last_rtt_ms: Some(4.5),
                seen_at_ms: 1_000,
                ..SlaDelta::default()
            },
        )
        .expect("first");
    assert_eq!(first.first_registered_at_ms, 1_000);
    assert_eq!(first.last_seen_at_ms, 1_000);
    assert_eq!(first.registrations, 1);
    assert_eq!(first.last_rtt_ms, Some(4.5));

    let deltas = [
        (60_000u64, 0u64, 3u64, 1u64, 0u64, None, 61_000u64),
        (30_000, 1, 2, 0, 2, Some(7.25), 91_000),
        // A late, out-of-order report must not move last_seen backwards nor forget the RTT.
        (5_000, 0, 1, 1, 1, None, 50_000),
    ];
    let mut expected = first.clone();
    for (registered_ms, registrations, served, failed, misses, rtt, seen) in deltas {
        let delta = SlaDelta {
            registered_ms,
            registrations,
            sessions_served: served,
            sessions_failed: failed,
            heartbeat_misses: misses,
            last_rtt_ms: rtt,
            seen_at_ms: seen,
        };
        let got = store.sla_apply("node-a", "op_1", delta).expect("apply");
        expected.registered_ms += registered_ms;
        expected.registrations += registrations;
        expected.sessions_served += served;
        expected.sessions_failed += failed;
        expected.heartbeat_misses += misses;
        expected.last_rtt_ms = rtt.or(expected.last_rtt_ms);
        expected.last_seen_at_ms = expected.last_seen_at_ms.max(seen);
        assert_eq!(got, expected);
    }
    assert_eq!(expected.last_seen_at_ms, 91_000);
    assert_eq!(expected.last_rtt_ms, Some(7.25));
    assert_eq!(
        store.sla_get("op_1", "node-a").expect("get"),
        Some(expected.clone())
    );

    let b = store
        .sla_apply(
            "node-0",
            "op_2",
            SlaDelta {
                seen_at_ms: 5,
                ..SlaDelta::default()
            },
        )
        .expect("b");
    assert_eq!(store.sla_list().expect("list"), vec![b, expected]);

    for (field, delta) in [
        (
            "last_rtt_ms",
            SlaDelta {
                last_rtt_ms: Some(f64::NAN),
                ..SlaDelta::default()
            },
        ),
        (
            "registered_ms",
            SlaDelta {
                registered_ms: u64::MAX,
                ..SlaDelta::default()
            },
        ),
    ] {
        match store.sla_apply("node-a", "op_1", delta) {
            Err(StoreError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected Invalid {field}, got {other:?}"),
        }
    }
    assert!(matches!(
        store.sla_apply("", "op_1", SlaDelta::default()),
        Err(StoreError::Invalid {
            field: "node_id",
            ..
        })
    ));
}

fn penalties_are_listed_counted_and_bump_the_sla_record(store: Arc<dyn Store>) {
    store
        .sla_apply(
            "node-a",
            "op_1",
            SlaDelta {
                registrations: 1,
                seen_at_ms: 100,
                ..SlaDelta::default()
            },
        )
        .expect("sla");
    let events = [
        ("node-a", 1_000u64, 3u32),
        ("node-b", 2_000, 1),
        ("node-a", 3_000, 0),
        ("node-a", 4_000, 7),
    ];
    let mut recorded = Vec::new();
    for (node, at, active) in events {
        let ev = store
            .record_penalty(
                node,
                "op_1",
                at,
                "disconnect_without_drain",
                active,
                &format!("{active} sessions cut"),
            )
            .expect("record");
        assert_eq!(
            (ev.node_id.as_str(), ev.at_ms, ev.active_sessions),
            (node, at, active)
        );
        recorded.push(ev);
    }
    let a = store
        .sla_get("op_1", "node-a")
        .expect("get")
        .expect("exists");
    assert_eq!(a.penalty_events, 3);
    assert_eq!(a.registrations, 1, "other counters untouched");
    let b = store
        .sla_get("op_1", "node-b")
        .expect("get")
        .expect("a penalty creates the SLA record");
    assert_eq!(b.penalty_events, 1);
    assert_eq!(b.first_registered_at_ms, 2_000);

    let newest_first: Vec<_> = recorded.iter().rev().cloned().collect();
    assert_eq!(store.list_penalties(None, 100).expect("list"), newest_first);
    assert_eq!(
        store.list_penalties(None, 2).expect("list"),
        newest_first[..2].to_vec()
    );
    let only_a: Vec<_> = newest_first
        .iter()
        .filter(|e| e.node_id == "node-a")
        .cloned()
        .collect();
    assert_eq!(
        store.list_penalties(Some("node-a"), 100).expect("list"),
        only_a
    );
    assert_eq!(
        store.list_penalties(Some("node-z"), 100).expect("list"),
        vec![]
    );

    assert_eq!(
        store.penalties_since("op_1", "node-a", 0).expect("count"),
        3
    );
    assert_eq!(
        store
            .penalties_since("op_1", "node-a", 3_000)
            .expect("count"),
        2
    );
    assert_eq!(
        store
            .penalties_since("op_1", "node-a", 4_001)
            .expect("count"),
        0
    );
    assert_eq!(
        store
            .penalties_since("op_1", "node-b", u64::MAX)
            .expect("count"),
        0
    );

    assert!(matches!(
        store.record_penalty("node-a", "op_1", 1, "k", 0, &"x".repeat(5000)),
        Err(StoreError::Invalid {
            field: "detail",
            ..
        })
    ));
    assert_eq!(
        store
            .sla_get("op_1", "node-a")
            .expect("get")
            .map(|r| r.penalty_events),
        Some(3),
        "a refused penalty changes nothing"
    );
}

fn node_ids_belong_to_their_first_operator_forever(store: Arc<dyn Store>) {
    assert_eq!(store.node_owner("acme-gpu-1").expect("owner"), None);
    assert_eq!(
        store
            .claim_node_id("acme-gpu-1", "op_acme", 10)
            .expect("claim"),
        "op_acme"
    );
    // Another operator cannot take it, now or later; the owner claims it again freely.
    assert_eq!(
        store
            .claim_node_id("acme-gpu-1", "op_evil", 20)
            .expect("claim"),
        "op_acme"
    );
    assert_eq!(
        store
            .claim_node_id("acme-gpu-1", "op_acme", 30)
            .expect("claim"),
        "op_acme"
    );
    assert_eq!(
        store.node_owner("acme-gpu-1").expect("owner").as_deref(),
        Some("op_acme")
    );
    assert!(matches!(
        store.claim_node_id("", "op_acme", 1),
        Err(StoreError::Invalid {
            field: "node_id",
            ..
        })
    ));
}

#[test]
fn racing_claims_of_a_fresh_node_id_have_one_winner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    drop(SqliteStore::open(&path).expect("create"));
    // Two stores on one file, as two gateways sharing it would be.
    let stores: Vec<Arc<dyn Store>> = (0..2)
        .map(|_| Arc::new(SqliteStore::open(&path).expect("open")) as Arc<dyn Store>)
        .collect();
    racing_claims_have_one_winner(&stores, 4);
}

/// `threads` threads over `stores` (gateways' stores on one database) claim each of 20 fresh
/// node ids at once: every thread reads back the same single owner.
fn racing_claims_have_one_winner(stores: &[Arc<dyn Store>], threads: usize) {
    for round in 0..20 {
        let id = format!("node-{round}");
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = Arc::clone(&stores[t % stores.len()]);
                let (barrier, id) = (Arc::clone(&barrier), id.clone());
                thread::spawn(move || {
                    barrier.wait();
                    store
                        .claim_node_id(&id, &format!("op_{t}"), 1)
                        .expect("claim")
                })
            })
            .collect();
        let owners: HashSet<String> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(owners.len(), 1, "round {round}: {owners:?}");
    }
}

fn sla_records_and_penalties_are_kept_per_operator(store: Arc<dyn Store>) {
    let seen = |at| SlaDelta {
        registrations: 1,
        seen_at_ms: at,
        ..SlaDelta::default()
    };
    store.sla_apply("gpu-1", "op_a", seen(1)).expect("a");
    store.sla_apply("gpu-1", "op_b", seen(2)).expect("b");
    store
        .record_penalty("gpu-1", "op_b", 5, "disconnect_without_drain", 40, "x")
        .expect("penalty");
    let a = store.sla_get("op_a", "gpu-1").expect("get").expect("a");
    let b = store.sla_get("op_b", "gpu-1").expect("get").expect("b");
    assert_eq!((a.operator_id.as_str(), a.penalty_events), ("op_a", 0));
    assert_eq!((b.operator_id.as_str(), b.penalty_events), ("op_b", 1));
    assert_eq!(store.penalties_since("op_a", "gpu-1", 0).expect("count"), 0);
    assert_eq!(store.penalties_since("op_b", "gpu-1", 0).expect("count"), 1);
    assert_eq!(store.sla_list().expect("list").len(), 2);
}

#[test]
fn a_version_1_database_is_migrated_to_per_operator_records_and_owned_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    {
        // The version 1 schema, as the first release wrote it, with a squatted id: acme's node
        // served first, then evil registered the same id (the SLA row names the last operator).
        let conn = rusqlite::Connection::open(&path).expect("raw");
        conn.execute_batch(V1_SCHEMA).expect("v1 schema");
        conn.execute_batch(
            "PRAGMA application_id = 1313883991; PRAGMA user_version = 1;
             INSERT INTO sla_records VALUES ('acme-gpu-1', 'op_evil', 100, 900, 50, 3, 7, 1, 2, 1, 4.5);
             INSERT INTO sla_records VALUES ('solo', 'op_solo', 200, 300, 10, 1, 0, 0, 0, 0, NULL);
             INSERT INTO penalty_events (node_id, operator_id, at_ms, kind, active_sessions, detail)
               VALUES ('acme-gpu-1', 'op_evil', 800, 'disconnect_without_drain', 40, 'cut');
             INSERT INTO usage_records (at_ms, kind, request_id, tenant, api_key_id, node_id,
               operator_id, workload, outcome, prompt_tokens, completion_tokens, ttft_ms,
               duration_ms, gpu_seconds, frames, bytes)
               VALUES (150, 'inference', 'r1', 't', 'k', 'acme-gpu-1', 'op_acme', 'm', 'ok',
                       1, 1, NULL, 1.0, 0.0, 0, 0),
                      (700, 'inference', 'r2', 't', 'k', 'acme-gpu-1', 'op_evil', 'm', 'ok',
                       1, 1, NULL, 1.0, 0.0, 0, 0);",
        )
        .expect("v1 rows");
    }
    let store = SqliteStore::open(&path).expect("migrate");
    // The id goes to the operator that served under it first; the lone node keeps its own.
    assert_eq!(
        store.node_owner("acme-gpu-1").expect("owner").as_deref(),
        Some("op_acme")
    );
    assert_eq!(
        store.node_owner("solo").expect("owner").as_deref(),
        Some("op_solo")
    );
    // The SLA record and the penalty stay with the operator that earned them.
    let evil = store
        .sla_get("op_evil", "acme-gpu-1")
        .expect("get")
        .expect("kept");
    assert_eq!((evil.registrations, evil.penalty_events), (3, 1));
    assert_eq!(store.sla_get("op_acme", "acme-gpu-1").expect("get"), None);
    assert_eq!(
        store
            .penalties_since("op_acme", "acme-gpu-1", 0)
            .expect("n"),
        0
    );
    assert_eq!(
        store
            .penalties_since("op_evil", "acme-gpu-1", 0)
            .expect("n"),
        1
    );
    // The new key works for writes: acme's record starts clean beside evil's.
    store
        .sla_apply(
            "acme-gpu-1",
            "op_acme",
            SlaDelta {
                registrations: 1,
                seen_at_ms: 1_000,
                ..SlaDelta::default()
            },
        )
        .expect("apply");
    assert_eq!(store.sla_list().expect("list").len(), 3);
    drop(store);
    let conn = rusqlite::Connection::open(&path).expect("raw");
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(v, SCHEMA_VERSION);
}

/// The version 1 schema (`MIGRATIONS[0]` of the first release), for the migration test.
const V1_SCHEMA: &str = r#"
CREATE TABLE operators (id TEXT PRIMARY KEY, name TEXT NOT NULL, kyc_status TEXT NOT NULL CHECK (kyc_status IN ('pending', 'verified', 'suspended')), created_at_ms INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL) STRICT;
CREATE TABLE enrolment_tokens (id TEXT PRIMARY KEY, operator_id TEXT NOT NULL REFERENCES operators (id), secret_hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, created_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER) STRICT;
CREATE INDEX enrolment_tokens_by_operator ON enrolment_tokens (operator_id);
CREATE TABLE api_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, secret_hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, requests_per_minute INTEGER NOT NULL, tokens_per_minute INTEGER NOT NULL, created_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER) STRICT;
CREATE TABLE sla_records (node_id TEXT PRIMARY KEY, operator_id TEXT NOT NULL, first_registered_at_ms INTEGER NOT NULL, last_seen_at_ms INTEGER NOT NULL, registered_ms INTEGER NOT NULL, registrations INTEGER NOT NULL, sessions_served INTEGER NOT NULL, sessions_failed INTEGER NOT NULL, heartbeat_misses INTEGER NOT NULL, penalty_events INTEGER NOT NULL, last_rtt_ms REAL) STRICT;
CREATE TABLE penalty_events (id INTEGER PRIMARY KEY AUTOINCREMENT, node_id TEXT NOT NULL, operator_id TEXT NOT NULL, at_ms INTEGER NOT NULL, kind TEXT NOT NULL, active_sessions INTEGER NOT NULL, detail TEXT NOT NULL) STRICT;
CREATE INDEX penalty_events_by_node ON penalty_events (node_id, at_ms);
CREATE TABLE usage_records (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('inference', 'game')), request_id TEXT NOT NULL, tenant TEXT NOT NULL, api_key_id TEXT NOT NULL, node_id TEXT NOT NULL, operator_id TEXT NOT NULL, workload TEXT NOT NULL, outcome TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, ttft_ms REAL, duration_ms REAL NOT NULL, gpu_seconds REAL NOT NULL, frames INTEGER NOT NULL, bytes INTEGER NOT NULL) STRICT;
CREATE INDEX usage_records_by_time ON usage_records (at_ms);
"#;

fn gpu_models_are_noted_while_unclassified_and_classified_by_admins(store: Arc<dyn Store>) {
    assert_eq!(store.gpu_model_class("acmeturbo9000").expect("get"), None);
    store
        .note_unclassified_gpu_model("acmeturbo9000", "Acme Turbo 9000", 10)
        .expect("note");
    store
        .note_unclassified_gpu_model("acmeturbo9000", "ACME turbo-9000", 20)
        .expect("note");
    let list = store.list_gpu_models().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (
            list[0].example.as_str(),
            list[0].class.as_deref(),
            list[0].seen
        ),
        ("Acme Turbo 9000", None, 2)
    );
    assert_eq!(
        (list[0].first_seen_at_ms, list[0].last_seen_at_ms),
        (10, 20)
    );
    let rec = store
        .set_gpu_model_class("acmeturbo9000", "Acme Turbo 9000", "rtx3080", 30)
        .expect("classify");
    assert_eq!(rec.class.as_deref(), Some("rtx3080"));
    assert_eq!(rec.classified_at_ms, Some(30));
    assert_eq!(
        store
            .gpu_model_class("acmeturbo9000")
            .expect("get")
            .as_deref(),
        Some("rtx3080")
    );
    // Classifying a model never seen works too, and a new class replaces the old one.
    store
        .set_gpu_model_class("x1", "X1", "h100", 40)
        .expect("classify");
    store
        .set_gpu_model_class("x1", "X1", "a100", 50)
        .expect("reclassify");
    assert_eq!(
        store.gpu_model_class("x1").expect("get").as_deref(),
        Some("a100")
    );
    assert_eq!(store.list_gpu_models().expect("list").len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Usage ledger

fn expected_totals<'a>(
    records: impl Iterator<Item = &'a UsageRecord>,
    key: impl Fn(&UsageRecord) -> Option<String>,
) -> Vec<UsageTotals> {
    let mut map: BTreeMap<String, UsageTotals> = BTreeMap::new();
    for r in records {
        let Some(k) = key(r) else { continue };
        let t = map.entry(k.clone()).or_insert_with(|| UsageTotals {
            key: k,
            requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            gpu_seconds: 0.0,
            frames: 0,
            bytes: 0,
            errors: 0,
        });
        t.requests += 1;
        t.prompt_tokens += r.prompt_tokens;
        t.completion_tokens += r.completion_tokens;
        t.gpu_seconds += r.gpu_seconds;
        t.frames += r.frames;
        t.bytes += r.bytes;
        t.errors += u64::from(r.outcome != "ok" && r.outcome != "cancelled");
    }
    map.into_values().collect()
}

fn assert_totals_eq(got: &[UsageTotals], want: &[UsageTotals]) {
    assert_eq!(got.len(), want.len(), "{got:#?} vs {want:#?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.gpu_seconds - w.gpu_seconds).abs() < 1e-9,
            "{g:?} vs {w:?}"
        );
        let mut g = g.clone();
        g.gpu_seconds = w.gpu_seconds;
        assert_eq!(&g, w);
    }
}

fn usage_is_listed_and_summed(store: Arc<dyn Store>) {
    let tenants = ["acme", "beta", "zeta"];
    let nodes = ["node-1", "node-2", ""];
    let outcomes = ["ok", "ok", "error", "cancelled", "timeout"];
    let mut appended = Vec::new();
    for n in 0..60u64 {
        let mut r = usage(
            n,
            tenants[(n * 7 % 3) as usize],
            nodes[(n * 5 % 3) as usize],
            outcomes[(n % 5) as usize],
        );
        let id = store.append_usage(r.clone()).expect("append");
        r.id = Some(id);
        appended.push(r);
    }
    let ids: HashSet<_> = appended.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), appended.len(), "ids are unique");

    let newest_first: Vec<_> = appended.iter().rev().cloned().collect();
    assert_eq!(
        store.list_usage(5).expect("list"),
        newest_first[..5].to_vec()
    );
    assert_eq!(store.list_usage(1000).expect("list"), newest_first);

    let summary = store.usage_summary(None).expect("summary");
    assert_totals_eq(
        &summary.by_tenant,
        &expected_totals(appended.iter(), |r| Some(r.tenant.clone())),
    );
    let by_node = expected_totals(appended.iter(), |r| {
        (!r.node_id.is_empty()).then(|| r.node_id.clone())
    });
    assert_eq!(by_node.len(), 2, "records without a node are not a node");
    assert_totals_eq(&summary.by_node, &by_node);

    let since = appended[40].at_ms;
    let recent = store.usage_summary(Some(since)).expect("summary since");
    let later = || appended.iter().filter(|r| r.at_ms >= since);
    assert_totals_eq(
        &recent.by_tenant,
        &expected_totals(later(), |r| Some(r.tenant.clone())),
    );
    assert_eq!(recent.by_tenant.iter().map(|t| t.requests).sum::<u64>(), 20);
    let empty = store.usage_summary(Some(u64::MAX)).expect("summary");
    assert!(empty.by_tenant.is_empty() && empty.by_node.is_empty());
}

fn invalid_usage_is_refused_before_reaching_the_ledger(store: Arc<dyn Store>) {
    let cases: [(&str, UsageRecord); 5] = [
        (
            "duration_ms",
            UsageRecord {
                duration_ms: f64::NAN,
                ..usage(1, "t", "n", "ok")
            },
        ),
        (
            "gpu_seconds",
            UsageRecord {
                gpu_seconds: -1.0,
                ..usage(1, "t", "n", "ok")
            },
        ),
        (
            "ttft_ms",
            UsageRecord {
                ttft_ms: Some(f64::INFINITY),
                ..usage(1, "t", "n", "ok")
            },
        ),
        (
            "prompt_tokens",
            UsageRecord {
                prompt_tokens: u64::MAX,
                ..usage(1, "t", "n", "ok")
            },
        ),
        (
            "workload",
            UsageRecord {
                workload: "w".repeat(5000),
                ..usage(1, "t", "n", "ok")
            },
        ),
    ];
    for (field, record) in cases {
        match store.append_usage(record) {
            Err(StoreError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected Invalid {field}, got {other:?}"),
        }
    }
    assert!(store.list_usage(10).expect("list").is_empty());
}

#[test]
fn concurrent_appends_share_commits() {
    const THREADS: usize = 16;
    const PER_THREAD: u64 = 50;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open(dir.path().join("ledger.db")).expect("open"));
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                (0..PER_THREAD)
                    .map(|n| {
                        let mut r = usage(n, &format!("tenant-{t}"), "node-1", "ok");
                        r.request_id = format!("t{t}-{n}");
                        let id = store.append_usage(r.clone()).expect("append");
                        r.id = Some(id);
                        r
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked = Vec::new();
    for h in handles {
        acked.extend(h.join().expect("thread"));
    }
    let total = THREADS as u64 * PER_THREAD;
    let stats = store.writer_stats();
    assert_eq!(stats.records, total);
    assert!(
        stats.batches < stats.records,
        "16 concurrent writers never shared a commit: {stats:?}"
    );
    let stored: HashMap<i64, UsageRecord> = store
        .list_usage(usize::MAX)
        .expect("list")
        .into_iter()
        .map(|r| (r.id.expect("id"), r))
        .collect();
    assert_eq!(stored.len() as u64, total);
    for r in &acked {
        assert_eq!(stored.get(&r.id.expect("id")), Some(r));
    }
    eprintln!(
        "concurrent_appends_share_commits: {} records in {} commits",
        stats.records, stats.batches
    );
}

// ---------------------------------------------------------------------------------------------
// Files: reopen, schema versions, bad files, locks

#[test]
fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    let store = SqliteStore::open(&path).expect("open");
    let op = store
        .create_operator("Op", KycStatus::Verified)
        .expect("op");
    let (tok, tok_secret) = store.create_enrolment_token(&op.id).expect("tok");
    let (revoked_tok, _) = store.create_enrolment_token(&op.id).expect("tok2");
    store
        .revoke_enrolment_token(&revoked_tok.id)
        .expect("revoke");
    let (key, key_secret) = store.create_api_key("acme", 10, 20).expect("key");
    let (gone, gone_secret) = store.create_api_key("acme", 10, 20).expect("key2");
    store.revoke_api_key(&gone.id).expect("revoke");
    store
        .sla_apply(
            "node-1",
            &op.id,
            SlaDelta {
                registered_ms: 1234,
                registrations: 1,
                sessions_served: 5,
                last_rtt_ms: Some(3.0),
                seen_at_ms: 99,
                ..SlaDelta::default()
            },
        )
        .expect("sla");
    store
        .record_penalty("node-1", &op.id, 500, "disconnect_without_drain", 2, "bye")
        .expect("penalty");
    for n in 0..10 {
        store
            .append_usage(usage(n, "acme", "node-1", "ok"))
            .expect("usage");
    }
    let before = (
        store.list_operators().expect("ops"),
        store.list_enrolment_tokens(&op.id).expect("toks"),
        store.list_api_keys().expect("keys"),
        store.sla_list().expect("sla"),
        store.list_penalties(None, 100).expect("pen"),
        store.list_usage(100).expect("usage"),
        store.usage_summary(None).expect("summary"),
    );
    drop(store);

    let store = SqliteStore::open(&path).expect("reopen");
    let after = (
        store.list_operators().expect("ops"),
        store.list_enrolment_tokens(&op.id).expect("toks"),
        store.list_api_keys().expect("keys"),
        store.sla_list().expect("sla"),
        store.list_penalties(None, 100).expect("pen"),
        store.list_usage(100).expect("usage"),
        store.usage_summary(None).expect("summary"),
    );
    assert_eq!(before, after);
    assert_eq!(after.5.len(), 10);
    assert_eq!(
        store
            .authenticate_enrolment_token(&tok_secret)
            .expect("auth")
            .map(|(_, t)| t),
        Some(tok)
    );
    assert_eq!(
        store.authenticate_api_key(&key_secret).expect("auth"),
        Some(key)
    );
    assert_eq!(
        store.authenticate_api_key(&gone_secret).expect("auth"),
        None
    );
    // New ids continue after the old ones.
    let next = store
        .append_usage(usage(99, "acme", "node-1", "ok"))
        .expect("append");
    assert!(after.5.iter().all(|r| r.id < Some(next)));
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    drop(SqliteStore::open(&path).expect("create"));
    {
        let conn = rusqlite::Connection::open(&path).expect("raw");
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(
            v, SCHEMA_VERSION,
            "a fresh database gets the current schema"
        );
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("bump");
    }
    match SqliteStore::open(&path) {
        Err(err @ StoreError::SchemaTooNew { .. }) => {
            let StoreError::SchemaTooNew {
                found, supported, ..
            } = &err
            else {
                unreachable!()
            };
            assert_eq!((*found, *supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("newer"), "{msg}");
            assert!(!err.is_retryable());
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    let content = "these are not the tables you are looking for\n".repeat(100);
    std::fs::write(&path, &content).expect("write");
    let err = SqliteStore::open(&path).expect_err("must refuse");
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("not a database"), "{msg}");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), content);
}

#[test]
fn another_applications_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other.db");
    {
        let conn = rusqlite::Connection::open(&path).expect("raw");
        conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hi');")
            .expect("create");
    }
    let err = SqliteStore::open(&path).expect_err("must refuse");
    assert!(
        matches!(err, StoreError::ForeignDatabase { tables: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&path.display().to_string()));
    let conn = rusqlite::Connection::open(&path).expect("raw");
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .expect("count");
    assert_eq!(tables, 1, "nothing was added to the foreign database");
}

#[test]
fn a_missing_directory_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no-such-dir").join("gateway.db");
    let err = SqliteStore::open(&path).expect_err("must refuse");
    assert!(
        matches!(err, StoreError::MissingDirectory { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&path.display().to_string()));
    assert!(
        !dir.path().join("no-such-dir").exists(),
        "no directory created"
    );
}

#[test]
fn a_held_lock_gives_retryable_errors_and_reads_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    let store =
        SqliteStore::open_with_busy_timeout(&path, Duration::from_millis(50)).expect("open");
    let op = store
        .create_operator("Op", KycStatus::Pending)
        .expect("create");
    let other = rusqlite::Connection::open(&path).expect("raw");
    other.execute_batch("BEGIN EXCLUSIVE").expect("lock");

    let err = store
        .create_operator("Blocked", KycStatus::Pending)
        .expect_err("write while locked");
    assert!(err.is_retryable(), "{err:?}");
    let err = store
        .append_usage(usage(1, "t", "n", "ok"))
        .expect_err("append while locked");
    assert!(err.is_retryable(), "{err:?}");
    // WAL: readers are not blocked by the writer's lock.
    assert_eq!(store.list_operators().expect("read"), vec![op]);

    other.execute_batch("COMMIT").expect("unlock");
    store
        .create_operator("Unblocked", KycStatus::Pending)
        .expect("write after unlock");
    store
        .append_usage(usage(1, "t", "n", "ok"))
        .expect("append after unlock");
    assert_eq!(store.list_usage(10).expect("list").len(), 1);
}

#[tokio::test]
async fn works_from_async_code_through_spawn_blocking() {
    works_from_async_code(mem()).await;
}

async fn works_from_async_code(store: Arc<dyn Store>) {
    let id = tokio::task::spawn_blocking({
        let store = Arc::clone(&store);
        move || store.append_usage(usage(1, "t", "n", "ok"))
    })
    .await
    .expect("join")
    .expect("append");
    let listed = tokio::task::spawn_blocking(move || store.list_usage(1))
        .await
        .expect("join")
        .expect("list");
    assert_eq!(listed.first().and_then(|r| r.id), Some(id));
}

// ---------------------------------------------------------------------------------------------
// kill -9 durability

const CHILD_ENV: &str = "NEARPATH_STORE_CHILD";
const CHILD_USAGE_THREADS: u64 = 4;

fn child_usage(thread: u64, n: u64) -> UsageRecord {
    let mut r = usage(n, &format!("tenant-{thread}"), "node-k9", "ok");
    r.request_id = format!("t{thread}-{n}");
    r
}

/// Writes one line to the real stdout (not libtest's capture) and flushes it; false once the
/// parent has stopped reading.
fn ack(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// The child half of `kill9_loses_no_acknowledged_record`: appends usage records from several
/// threads and penalty events from one, printing each id once the store has acknowledged it,
/// until it is killed. Ignored, so that it runs only when the parent asks for it by name.
#[test]
#[ignore = "child process of kill9_loses_no_acknowledged_record; does nothing on its own"]
fn kill9_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = Arc::new(SqliteStore::open(&path).expect("child: open store"));
    let mut handles = Vec::new();
    for t in 0..CHILD_USAGE_THREADS {
        let store = Arc::clone(&store);
        handles.push(thread::spawn(move || {
            // Bounded so that an orphaned child ends by itself; the parent kills it long before.
            for n in 0..1_000_000 {
                let id = store
                    .append_usage(child_usage(t, n))
                    .expect("child: append");
                if !ack(&format!("ack usage {id} t{t}-{n}")) {
                    return;
                }
            }
        }));
    }
    let store = Arc::clone(&store);
    handles.push(thread::spawn(move || {
        for n in 0..1_000_000u64 {
            let ev = store
                .record_penalty(
                    "node-k9",
                    "op_k9",
                    n,
                    "disconnect_without_drain",
                    (n % 5) as u32,
                    &format!("p{n}"),
                )
                .expect("child: penalty");
            if !ack(&format!("ack penalty {} p{n}", ev.id)) {
                return;
            }
        }
    }));
    for h in handles {
        h.join().expect("child thread");
    }
}

/// Parses a child's `ack <usage|penalty> <id> <tag>` line; other lines (libtest's) give `None`.
fn parse_ack(line: &str) -> Option<(bool, i64, String)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("ack"), Some(kind), Some(id), Some(tag)) => {
            let id = id.parse().ok()?;
            Some((kind == "usage", id, tag.to_owned()))
        }
        _ => None,
    }
}

#[test]
fn kill9_loses_no_acknowledged_record() {
    const WANT_USAGE: usize = 400;
    const WANT_PENALTIES: usize = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "kill9_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut usage_acks: HashMap<i64, String> = HashMap::new();
    let mut penalty_acks: HashMap<i64, String> = HashMap::new();
    let take = |line: String,
                usage_acks: &mut HashMap<i64, String>,
                penalty_acks: &mut HashMap<i64, String>| {
        if let Some((is_usage, id, tag)) = parse_ack(&line) {
            let acks = if is_usage { usage_acks } else { penalty_acks };
            assert!(acks.insert(id, tag).is_none(), "id {id} acknowledged twice");
        }
    };
    // Read until enough acknowledgements are in, then kill mid-stream. The timeout only guards
    // against a child that hangs; it does not stand in for any synchronisation.
    let deadline = Instant::now() + Duration::from_secs(120);
    while usage_acks.len() < WANT_USAGE || penalty_acks.len() < WANT_PENALTIES {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => take(line, &mut usage_acks, &mut penalty_acks),
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "child stopped early ({e:?}, {status:?}) after {} usage and {} penalty acks",
                    usage_acks.len(),
                    penalty_acks.len()
                );
            }
        }
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("wait for child");
    assert!(
        !status.success(),
        "the child was killed, not finished: {status:?}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
    // Acknowledgements printed before the kill may still sit in the pipe: they count too.
    for line in lines.iter() {
        take(line, &mut usage_acks, &mut penalty_acks);
    }
    reader.join().expect("reader thread");

    let store = SqliteStore::open(&path).expect("reopen after kill -9");
    let stored: HashMap<i64, UsageRecord> = store
        .list_usage(usize::MAX)
        .expect("list usage")
        .into_iter()
        .map(|r| (r.id.expect("id"), r))
        .collect();
    for (id, tag) in &usage_acks {
        let record = stored
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged usage record {id} ({tag}) lost"));
        let (t, n) = tag
            .strip_prefix('t')
            .and_then(|s| s.split_once('-'))
            .and_then(|(t, n)| Some((t.parse().ok()?, n.parse().ok()?)))
            .expect("tag shape");
        let mut want = child_usage(t, n);
        want.id = Some(*id);
        assert_eq!(record, &want);
    }
    let penalties: HashMap<i64, String> = store
        .list_penalties(Some("node-k9"), usize::MAX)
        .expect("list penalties")
        .into_iter()
        .map(|p| (p.id, p.detail))
        .collect();
    for (id, tag) in &penalty_acks {
        assert_eq!(
            penalties.get(id),
            Some(tag),
            "acknowledged penalty {id} lost or changed"
        );
    }
    // The SLA counter moved in the same transactions as the penalty rows.
    let sla = store
        .sla_get("op_k9", "node-k9")
        .expect("sla")
        .expect("sla exists");
    assert_eq!(sla.penalty_events, penalties.len() as u64);
    // The reopened ledger takes new records.
    let next = store
        .append_usage(child_usage(99, 0))
        .expect("append after recovery");
    assert!(stored.keys().all(|id| *id < next));
    eprintln!(
        "kill9: {} usage and {} penalty acks, {} usage and {} penalty rows after recovery",
        usage_acks.len(),
        penalty_acks.len(),
        stored.len(),
        penalties.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Throughput (run with `--ignored --nocapture bench_`)

fn appends_per_second(threads: usize, per_thread: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open(dir.path().join("bench.db")).expect("open"));
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                for n in 0..per_thread {
                    store
                        .append_usage(child_usage(t as u64, n))
                        .expect("append");
                }
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for h in handles {
        h.join().expect("thread");
    }
    let secs = began.elapsed().as_secs_f64();
    let stats = store.writer_stats();
    (
        (threads as u64 * per_thread) as f64 / secs,
        stats.records as f64 / stats.batches as f64,
    )
}

#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_append_usage_throughput() {
    for (threads, per_thread) in [(1usize, 400u64), (16, 250)] {
        let mut rates = Vec::new();
        let mut batch = Vec::new();
        for _ in 0..7 {
            let (rate, mean_batch) = appends_per_second(threads, per_thread);
            rates.push(rate);
            batch.push(mean_batch);
        }
        rates.sort_by(f64::total_cmp);
        batch.sort_by(f64::total_cmp);
        println!(
            "{threads:>2} thread(s): median {:.0} appends/s (min {:.0}, max {:.0}); median batch {:.1} records/commit",
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1],
            batch[batch.len() / 2]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// API key policy (issue 12) and usage by key and day.

fn a_key_policy_round_trips_and_bad_values_are_refused_naming_the_field(store: Arc<dyn Store>) {
    use nearpath_gateway::store::ApiKeyUpdate;
    let (k, secret) = store.create_api_key("acme", 60, 10_000).expect("key");
    assert_eq!(k.policy, Default::default());
    let update = ApiKeyUpdate {
        allowed_models: Some(vec!["org/*".into(), "m".into()]),
        expires_at_ms: Some(Some(4_102_444_800_000)),
        budget_tokens_per_day: Some(Some(1_000)),
        budget_usd_per_month: Some(Some(2.5)),
        ..Default::default()
    };
    let k = store.update_api_key(&k.id, update).expect("update");
    assert_eq!(k.policy.allowed_models, ["org/*", "m"]);
    assert!(k.policy.allows_model("org/a") && k.policy.allows_model("m"));
    assert!(!k.policy.allows_model("mm") && !k.policy.allows_model("org"));
    let read = store
        .authenticate_api_key(&secret)
        .expect("auth")
        .expect("key");
    assert_eq!(read, k);
    assert_eq!(store.list_api_keys().unwrap()[0], k);
    // `Some(None)` and an empty list remove restrictions; untouched fields stay.
    let k = store
        .update_api_key(
            &k.id,
            ApiKeyUpdate {
                allowed_models: Some(vec![]),
                budget_tokens_per_day: Some(None),
                ..Default::default()
            },
        )
        .expect("reset");
    assert!(k.policy.allowed_models.is_empty());
    assert_eq!(k.policy.budget_tokens_per_day, None);
    assert_eq!(k.policy.budget_usd_per_month, Some(2.5));
    // Hostile values: each refused with its field, nothing written.
    let long = "x".repeat(257);
    let many: Vec<String> = (0..257).map(|i| format!("m{i}")).collect();
    for (update, field) in [
        (
            ApiKeyUpdate {
                allowed_models: Some(vec![String::new()]),
                ..Default::default()
            },
            "allowed_models",
        ),
        (
            ApiKeyUpdate {
                allowed_models: Some(vec![long]),
                ..Default::default()
            },
            "allowed_models",
        ),
        (
            ApiKeyUpdate {
                allowed_models: Some(many),
                ..Default::default()
            },
            "allowed_models",
        ),
        (
            ApiKeyUpdate {
                allowed_models: Some(vec!["a*b".into()]),
                ..Default::default()
            },
            "allowed_models",
        ),
        (
            ApiKeyUpdate {
                budget_usd_per_day: Some(Some(-1.0)),
                ..Default::default()
            },
            "budget_usd_per_day",
        ),
        (
            ApiKeyUpdate {
                budget_usd_per_month: Some(Some(f64::NAN)),
                ..Default::default()
            },
            "budget_usd_per_month",
        ),
        (
            ApiKeyUpdate {
                budget_tokens_per_month: Some(Some(u64::MAX)),
                ..Default::default()
            },
            "budget_tokens_per_month",
        ),
    ] {
        match store.update_api_key(&k.id, update) {
            Err(StoreError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert_eq!(store.list_api_keys().unwrap()[0], k);
}

fn key_usage_is_summed_by_key_utc_day_and_model_over_inference_records_only(store: Arc<dyn Store>) {
    let day = 86_400_000u64;
    let base = 20_000 * day;
    let rec = |key: &str, at_ms: u64, model: &str, kind: UsageKind, p: u64, c: u64| {
        let mut r = usage(1, "t", "n", "ok");
        r.api_key_id = key.into();
        r.at_ms = at_ms;
        r.workload = model.into();
        r.kind = kind;
        r.prompt_tokens = p;
        r.completion_tokens = c;
        r
    };
    for r in [
        rec("key_a", base, "m", UsageKind::Inference, 1, 2),
        rec("key_a", base + day - 1, "m", UsageKind::Inference, 10, 20),
        rec("key_a", base + day, "m", UsageKind::Inference, 100, 200),
        rec("key_a", base + 5, "other", UsageKind::Inference, 3, 3),
        rec("key_a", base + 6, "doom", UsageKind::Game, 0, 0),
        rec("key_b", base, "m", UsageKind::Inference, 7, 7),
    ] {
        store.append_usage(r).expect("append");
    }
    let rows = store
        .key_usage_by_day(Some("key_a"), base, base + 2 * day)
        .expect("query");
    let got: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.day,
                r.model.as_str(),
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (20_000, "m", 2, 11, 22),
            (20_000, "other", 1, 3, 3),
            (20_001, "m", 1, 100, 200)
        ]
    );
    // The end is exclusive; all keys when none is named.
    let all = store.key_usage_by_day(None, base, base + day).expect("all");
    assert_eq!(all.len(), 3);
    assert_eq!(all[2].api_key_id, "key_b");
}

/// The sessions directory (issue 13, session resume): put replaces by id, ids use the whole
/// u64 range (random session ids above i64::MAX included), remove is idempotent.
fn sessions_directory_keeps_one_entry_per_session_id_across_the_u64_range(store: Arc<dyn Store>) {
    use nearpath_gateway::store::SessionDirEntry;
    let entry = |id: u64, node: &str| SessionDirEntry {
        session_id: id,
        key_id: "key_a".into(),
        node_id: node.into(),
        gateway_id: "eu-1".into(),
        game: "arena".into(),
        width: 1280,
        height: 720,
        fps: 60,
        bitrate_kbps: 10_000,
        // The codec is kept per entry and replaced with it (issue 15: a resume reopens the
        // session in its codec).
        codec: if node == "n2" {
            nearpath_protocol::VideoCodec::Av1
        } else {
            nearpath_protocol::VideoCodec::H264
        },
        resume_token_sha256: hash_secret("resume-token"),
        updated_at_ms: 1_800_000_000_000,
    };
    let big = u64::MAX - 7;
    store.put_session_dir(&entry(big, "n1")).expect("put");
    store.put_session_dir(&entry(5, "n1")).expect("put");
    store.put_session_dir(&entry(big, "n2")).expect("replace");
    assert_eq!(
        store.get_session_dir(big).expect("get"),
        Some(entry(big, "n2"))
    );
    assert_eq!(store.get_session_dir(5).expect("get"), Some(entry(5, "n1")));
    assert_eq!(store.get_session_dir(6).expect("get"), None);
    // Only the gateway holding the entry removes it: a gateway ending its share of a session
    // that a player resumed elsewhere leaves the new gateway's entry alone.
    store
        .remove_session_dir(big, "us-1")
        .expect("remove by another gateway");
    assert_eq!(
        store.get_session_dir(big).expect("get"),
        Some(entry(big, "n2"))
    );
    store.remove_session_dir(big, "eu-1").expect("remove");
    store.remove_session_dir(big, "eu-1").expect("remove twice");
    assert_eq!(store.get_session_dir(big).expect("get"), None);
}

/// The federation secret is created once and then always read back, whatever candidate a
/// later caller offers (two gateways starting together agree on one secret).
fn the_federation_secret_is_created_once_and_shared(store: Arc<dyn Store>) {
    let first = store.federation_secret(&[1u8; 32]).expect("create");
    assert_eq!(first, vec![1u8; 32]);
    assert_eq!(store.federation_secret(&[2u8; 32]).expect("read"), first);
    assert!(matches!(
        store.federation_secret(&[3u8; 8]),
        Err(StoreError::Invalid { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Hostile input (both stores)

fn hostile_names_and_ids_are_refused_naming_the_field(store: Arc<dyn Store>) {
    let huge = "x".repeat(100_000);
    for (bad, what) in [
        (huge.as_str(), "huge"),
        ("nul\0inside", "NUL"),
        ("bell\u{7}", "control character"),
        ("line\nbreak", "newline"),
    ] {
        match store.create_operator(bad, KycStatus::Verified) {
            Err(StoreError::Invalid { field: "name", .. }) => {}
            other => panic!("operator name ({what}): expected Invalid, got {other:?}"),
        }
        match store.insert_api_key_secret("npk_hostile", bad, 1, 1) {
            Err(StoreError::Invalid {
                field: "tenant", ..
            }) => {}
            other => panic!("tenant ({what}): expected Invalid, got {other:?}"),
        }
        match store.insert_api_key_secret(bad, "tenant", 1, 1) {
            Err(StoreError::Invalid {
                field: "secret", ..
            }) => {}
            other => panic!("secret ({what}): expected Invalid, got {other:?}"),
        }
        // Authentication with such a secret finds nothing and fails nothing.
        assert_eq!(store.authenticate_api_key(bad).expect("auth"), None);
        assert!(store
            .authenticate_enrolment_token(bad)
            .expect("auth")
            .is_none());
    }
    let huge_id = "n".repeat(257);
    match store.claim_node_id(&huge_id, "op_a", 1) {
        Err(StoreError::Invalid {
            field: "node_id", ..
        }) => {}
        other => panic!("huge node id: expected Invalid, got {other:?}"),
    }
    match store.record_penalty("node", "op_a", 1, "kind", 1, &huge) {
        Err(StoreError::Invalid {
            field: "detail", ..
        }) => {}
        other => panic!("huge penalty detail: expected Invalid, got {other:?}"),
    }
    match store.sla_apply(
        "node",
        "op_a",
        SlaDelta {
            registered_ms: u64::MAX,
            ..SlaDelta::default()
        },
    ) {
        Err(StoreError::Invalid {
            field: "registered_ms",
            ..
        }) => {}
        other => panic!("inflated SLA count: expected Invalid, got {other:?}"),
    }
    // Lookups of ids no store could hold are answered, not failed.
    assert_eq!(store.node_owner(&huge).expect("owner"), None);
    assert_eq!(store.node_owner("a\0b").expect("owner"), None);
    assert_eq!(store.get_operator("op_\0").expect("get"), None);
    for result in [
        store.revoke_api_key("key_\0"),
        store.revoke_enrolment_token("tok_\0"),
        store
            .set_operator_kyc("op_\0", KycStatus::Verified)
            .map(drop),
        store.list_enrolment_tokens("op_\0").map(drop),
        store.create_enrolment_token("op_\0").map(drop),
    ] {
        assert!(
            matches!(result, Err(StoreError::NotFound { .. })),
            "{result:?}"
        );
    }
    assert!(store.list_operators().expect("list").is_empty());
    assert!(store.list_api_keys().expect("list").is_empty());
    assert!(store.sla_list().expect("list").is_empty());
    assert!(store.ledger_health().healthy);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: concurrency, migration races, connection failures, visibility across gateways

#[test]
fn pg_racing_claims_from_many_threads_and_two_gateways_have_one_owner() {
    let Some(url) = pg_url("racing_claims") else {
        return;
    };
    let stores: Vec<Arc<dyn Store>> = (0..2)
        .map(|_| Arc::new(pg_open(&url)) as Arc<dyn Store>)
        .collect();
    racing_claims_have_one_winner(&stores, 16);
}

#[test]
fn pg_gateways_migrating_one_empty_database_together_all_succeed() {
    let Some(url) = pg_url("migrate_race") else {
        return;
    };
    const GATEWAYS: usize = 6;
    let barrier = Arc::new(Barrier::new(GATEWAYS));
    let handles: Vec<_> = (0..GATEWAYS)
        .map(|_| {
            let (barrier, url) = (Arc::clone(&barrier), url.clone());
            thread::spawn(move || {
                barrier.wait();
                PgStore::open(&url, 2, Duration::from_secs(20))
            })
        })
        .collect();
    let stores: Vec<PgStore> = handles
        .into_iter()
        .map(|h| h.join().expect("thread").expect("every gateway opens"))
        .collect();
    // Every gateway works on the one schema.
    let op = stores[0]
        .create_operator("Racer", KycStatus::Verified)
        .expect("create");
    for s in &stores {
        assert_eq!(s.get_operator(&op.id).expect("get").as_ref(), Some(&op));
    }
    let version = pg_query_i64(&url, "SELECT version FROM nearpath_schema WHERE id = 1");
    assert_eq!(version, nearpath_gateway::store::pg::PG_SCHEMA_VERSION);
    // Reopening an up-to-date database changes nothing and keeps everything.
    drop(stores);
    let again = pg_open(&url);
    assert_eq!(again.list_operators().expect("list"), vec![op]);
}

#[test]
fn pg_a_newer_schema_is_refused() {
    let Some(url) = pg_url("newer_schema") else {
        return;
    };
    drop(pg_open(&url));
    pg_execute(
        &url,
        "UPDATE nearpath_schema SET version = 999 WHERE id = 1",
    );
    match PgStore::open(&url, 1, Duration::from_secs(20)) {
        Err(StoreError::SchemaTooNew {
            found, supported, ..
        }) => {
            assert_eq!(found, 999);
            assert_eq!(supported, nearpath_gateway::store::pg::PG_SCHEMA_VERSION);
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[test]
fn pg_a_closed_port_is_unavailable_quickly_and_retryable() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let url = format!("postgresql://nearpath:secret-password@127.0.0.1:{port}/nearpath");
    let started = Instant::now();
    let err = PgStore::open(&url, 2, Duration::from_millis(300)).expect_err("nothing listens");
    let took = started.elapsed();
    assert!(
        matches!(err, StoreError::Unavailable { .. }),
        "expected Unavailable, got {err:?}"
    );
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        !err.to_string().contains("secret-password"),
        "the error must not show the password: {err}"
    );
    // The connect timeout bounds it (generous margin for a loaded machine).
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn pg_a_bad_url_is_invalid_naming_store_url() {
    match PgStore::open("postgresql://[::1", 1, Duration::from_millis(100)) {
        Err(StoreError::Invalid {
            field: "store.url", ..
        }) => {}
        other => panic!("expected Invalid store.url, got {other:?}"),
    }
}

#[test]
fn pg_a_usage_record_is_readable_by_another_gateway_as_soon_as_append_returns() {
    let Some(url) = pg_url("usage_visibility") else {
        return;
    };
    let (a, b) = (pg_open(&url), pg_open(&url));
    for n in 1..=20 {
        let id = a.append_usage(usage(n, "t", "n", "ok")).expect("append");
        // No polling: the acknowledgement means committed, so the other gateway sees it now.
        let seen = b.list_usage(1).expect("list");
        assert_eq!(seen.first().and_then(|r| r.id), Some(id), "record {n}");
    }
    let summary = b.usage_summary(None).expect("summary");
    assert_eq!(summary.by_tenant[0].requests, 20);
}

#[test]
fn pg_nul_in_ids_is_refused_and_in_usage_text_is_replaced_not_failed() {
    let Some(store) = pg_store("nul") else {
        return;
    };
    match store.claim_node_id("node\0x", "op_a", 1) {
        Err(StoreError::Invalid {
            field: "node_id", ..
        }) => {}
        other => panic!("NUL node id: expected Invalid, got {other:?}"),
    }
    match store.record_penalty("node", "op_a", 1, "kind", 1, "detail\0") {
        Err(StoreError::Invalid {
            field: "detail", ..
        }) => {}
        other => panic!("NUL detail: expected Invalid, got {other:?}"),
    }
    // A usage record is billing: a hostile model name must not make it (or the ledger) fail.
    let mut r = usage(1, "t", "n", "ok");
    r.workload = "evil\0model".into();
    let id = store.append_usage(r).expect("append");
    let stored = store.list_usage(1).expect("list");
    assert_eq!(stored[0].id, Some(id));
    assert_eq!(stored[0].workload, "evil\u{FFFD}model");
    assert!(store.ledger_health().healthy);
}

#[tokio::test]
async fn pg_works_from_async_code_and_drops_there() {
    // Opening and dropping happen on the runtime's thread here, as in `gateway run`.
    let Some(url) = pg_url("async") else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(pg_open(&url));
    let last = Arc::clone(&store);
    works_from_async_code(store).await;
    // The last reference goes here, on the runtime's thread.
    drop(last);
}

fn pg_client(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("raw connect")
}

fn pg_execute(url: &str, sql: &str) {
    pg_client(url).batch_execute(sql).expect("raw execute");
}

fn pg_query_i64(url: &str, sql: &str) -> i64 {
    pg_client(url)
        .query_one(sql, &[])
        .expect("raw query")
        .get::<_, i64>(0)
}

/// Polls `cond` until it holds or `limit` passes (the ledger probe runs every 500 ms).
fn holds_within(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

#[test]
fn pg_a_ledger_that_cannot_commit_is_unhealthy_until_a_probe_commits() {
    let Some(url) = pg_url("ledger_health") else {
        return;
    };
    let admin = pg::PgServer::shared().expect("server").url();
    let db = url.rsplit('/').next().expect("database name").to_string();
    // What a primary that came back read-only looks like: every new session of the database is
    // read-only, and the sessions the store holds are cut.
    let set_read_only = |on: bool| {
        pg_execute(
            &admin,
            &format!(
                "ALTER DATABASE \"{db}\" SET default_transaction_read_only = {on}; \
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{db}' AND pid <> pg_backend_pid()"
            ),
        )
    };
    let store = pg_open(&url);
    store
        .append_usage(usage(1, "t", "n", "ok"))
        .expect("append");
    assert!(store.ledger_health().healthy);

    set_read_only(true);
    let err = store
        .append_usage(usage(2, "t", "n", "ok"))
        .expect_err("a read-only database cannot take usage");
    assert!(matches!(err, StoreError::Postgres { .. }), "{err:?}");
    let h = store.ledger_health();
    assert!(!h.healthy, "{h:?}");
    assert!(h.write_failures >= 1, "{h:?}");
    // Probes keep failing (and counting) while it stays read-only; reads go on.
    assert!(holds_within(Duration::from_secs(20), || store
        .ledger_health()
        .write_failures
        >= 2));
    assert!(!store.ledger_health().healthy);
    assert_eq!(store.list_usage(10).expect("reads go on").len(), 1);

    set_read_only(false);
    // No usage write is needed to notice the recovery: the probe does.
    assert!(holds_within(Duration::from_secs(20), || store
        .ledger_health()
        .healthy));
    store
        .append_usage(usage(3, "t", "n", "ok"))
        .expect("append again");
    assert_eq!(store.list_usage(10).expect("list").len(), 2);
}

#[test]
fn pg_concurrent_appends_from_two_gateways_are_all_acknowledged_and_stored() {
    const THREADS: usize = 16;
    const PER_THREAD: u64 = 50;
    let Some(url) = pg_url("concurrent_appends") else {
        return;
    };
    let stores = [Arc::new(pg_open(&url)), Arc::new(pg_open(&url))];
    let start = Arc::new(Barrier::new(THREADS));
    let began = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&stores[t % 2]);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                (0..PER_THREAD)
                    .map(|n| {
                        let mut r = usage(n, &format!("tenant-{t}"), "node-1", "ok");
                        r.request_id = format!("t{t}-{n}");
                        r.id = Some(store.append_usage(r.clone()).expect("append"));
                        r
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked = Vec::new();
    for h in handles {
        acked.extend(h.join().expect("thread"));
    }
    let took = began.elapsed();
    let total = THREADS as u64 * PER_THREAD;
    let stored: HashMap<i64, UsageRecord> = stores[1]
        .list_usage(usize::MAX)
        .expect("list")
        .into_iter()
        .map(|r| (r.id.expect("id"), r))
        .collect();
    assert_eq!(
        stored.len() as u64,
        total,
        "every acknowledged id is one record"
    );
    for r in &acked {
        assert_eq!(stored.get(&r.id.expect("id")), Some(r));
    }
    eprintln!(
        "pg concurrent appends: {total} records from {THREADS} threads on 2 stores in {took:?} \
         ({:.0}/s, throwaway server with fsync off)",
        total as f64 / took.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// The checker's records (issue 14): check records and votes, GPU identities, verification
// snapshots

mod checker_support {
    use nearpath_gateway::store::{CheckRecordRow, GpuIdentityRow};

    pub fn check(node: &str, gateway: &str, state: &str, at_ms: u64) -> CheckRecordRow {
        CheckRecordRow {
            node_id: node.into(),
            gateway_id: gateway.into(),
            kind: "idle_probe".into(),
            state: state.into(),
            detail_json: format!("{{\"at\":{at_ms}}}"),
            at_ms,
        }
    }

    pub fn gpu(uuid: &str) -> GpuIdentityRow {
        GpuIdentityRow {
            uuid: uuid.into(),
            pci_device_id: 0x2330_10de,
            driver_version: "550.54.15".into(),
            model: "NVIDIA H100 80GB HBM3".into(),
        }
    }

    pub fn gpus(uuids: &[&str]) -> Vec<GpuIdentityRow> {
        uuids.iter().map(|u| gpu(u)).collect()
    }
}

use checker_support::{check, gpu, gpus};

fn votes(store: &Arc<dyn Store>, node: &str) -> Vec<(String, String, u64)> {
    store
        .latest_votes(node)
        .expect("votes")
        .into_iter()
        .map(|v| (v.gateway_id, v.state, v.at_ms))
        .collect()
}

fn vote(gateway: &str, state: &str, at_ms: u64) -> (String, String, u64) {
    (gateway.into(), state.into(), at_ms)
}

fn check_records_list_newest_first_and_each_gateway_keeps_its_newest_vote(store: Arc<dyn Store>) {
    // Two federated gateways and a standalone one check the same node.
    store
        .record_check(&check("n1", "eu-1", "verified", 1_000))
        .expect("eu-1");
    store
        .record_check(&check("n1", "us-1", "mislocated", 1_500))
        .expect("us-1");
    store
        .record_check(&check("n1", "eu-1", "impossible_claim", 2_000))
        .expect("eu-1 again");
    store
        .record_check(&check("n1", "", "verified", 1_200))
        .expect("standalone");
    // A record that arrives late (older than eu-1's vote) joins the history but not the vote.
    store
        .record_check(&check("n1", "eu-1", "verified", 1_800))
        .expect("late");
    store
        .record_check(&check("n2", "eu-1", "verified", 3_000))
        .expect("n2");

    let list = store.checks_of("n1", 10).expect("list");
    assert_eq!(
        list.iter()
            .map(|c| (c.gateway_id.as_str(), c.at_ms))
            .collect::<Vec<_>>(),
        [
            ("eu-1", 2_000),
            ("eu-1", 1_800),
            ("us-1", 1_500),
            ("", 1_200),
            ("eu-1", 1_000)
        ],
        "newest first, one node only"
    );
    assert_eq!(
        list[0],
        check("n1", "eu-1", "impossible_claim", 2_000),
        "round trip"
    );
    assert_eq!(store.checks_of("n1", 2).expect("limit").len(), 2);
    assert!(store.checks_of("n1", 0).expect("zero").is_empty());
    assert!(store.checks_of("nobody", 10).expect("unknown").is_empty());

    assert_eq!(
        votes(&store, "n1"),
        [
            vote("", "verified", 1_200),
            vote("eu-1", "impossible_claim", 2_000),
            vote("us-1", "mislocated", 1_500),
        ],
        "one vote per gateway, its newest"
    );
    assert_eq!(
        store.latest_votes("n1").expect("votes")[1].kind,
        "idle_probe"
    );
    // Same time from the same gateway: the later write wins.
    store
        .record_check(&check("n1", "us-1", "verified", 1_500))
        .expect("tie");
    assert_eq!(votes(&store, "n1")[2], vote("us-1", "verified", 1_500));

    // Retention by age: records and votes older than the bound go.
    let deleted = store.prune_checks(1_600).expect("prune");
    assert_eq!(
        deleted,
        4 + 2,
        "4 records (1000, 1200, 1500 twice) and 2 votes"
    );
    assert_eq!(
        store
            .checks_of("n1", 10)
            .expect("list")
            .iter()
            .map(|c| c.at_ms)
            .collect::<Vec<_>>(),
        [2_000, 1_800]
    );
    assert_eq!(
        votes(&store, "n1"),
        [vote("eu-1", "impossible_claim", 2_000)]
    );
    assert_eq!(store.checks_of("n2", 10).expect("n2").len(), 1);
}

/// A hostile node can make the gateway check it as often as it likes (reconnecting, say):
/// its history stays capped, and the cap never erases another gateway's vote.
fn check_records_are_capped_per_node_and_the_cap_never_drops_a_vote(store: Arc<dyn Store>) {
    use nearpath_gateway::store::{MAX_CHECKS_LIST, MAX_CHECKS_PER_NODE};
    store
        .record_check(&check("n1", "us-1", "verified", 1))
        .expect("us-1");
    store
        .record_check(&check("n2", "eu-1", "verified", 1))
        .expect("n2");
    let extra = 25;
    for i in 0..(MAX_CHECKS_PER_NODE + extra) as u64 {
        store
            .record_check(&check("n1", "eu-1", "quarantined", 10 + i))
            .expect("record");
    }
    let list = store.checks_of("n1", usize::MAX).expect("list");
    assert_eq!(list.len(), MAX_CHECKS_PER_NODE.min(MAX_CHECKS_LIST));
    assert_eq!(list[0].at_ms, 10 + (MAX_CHECKS_PER_NODE + extra) as u64 - 1);
    assert_eq!(
        list.last().map(|c| c.at_ms),
        Some(10 + extra as u64),
        "the oldest went first (us-1's record included)"
    );
    assert_eq!(
        votes(&store, "n1"),
        [
            vote(
                "eu-1",
                "quarantined",
                10 + (MAX_CHECKS_PER_NODE + extra) as u64 - 1
            ),
            vote("us-1", "verified", 1),
        ]
    );
    assert_eq!(
        store.checks_of("n2", 10).expect("n2").len(),
        1,
        "other nodes untouched"
    );
}

fn hostile_check_records_and_verifications_are_refused_naming_the_field(store: Arc<dyn Store>) {
    use nearpath_gateway::store::MAX_CHECK_DETAIL_BYTES;
    let huge_id = "n".repeat(257);
    let huge_detail = format!("\"{}\"", "x".repeat(MAX_CHECK_DETAIL_BYTES));
    let bad: Vec<(&str, CheckEdit)> = vec![
        ("node_id", Box::new(|c| c.node_id = String::new())),
        ("node_id", Box::new(move |c| c.node_id = huge_id.clone())),
        ("node_id", Box::new(|c| c.node_id = "n\0".into())),
        ("gateway_id", Box::new(|c| c.gateway_id = "eu 1".into())),
        ("gateway_id", Box::new(|c| c.gateway_id = "g".repeat(65))),
        ("kind", Box::new(|c| c.kind = String::new())),
        ("kind", Box::new(|c| c.kind = "k".repeat(65))),
        ("state", Box::new(|c| c.state = "verified\n".into())),
        (
            "state",
            Box::new(|c| c.state = "'; DROP TABLE check_records; --".into()),
        ),
        (
            "detail_json",
            Box::new(move |c| c.detail_json = huge_detail.clone()),
        ),
        (
            "detail_json",
            Box::new(|c| c.detail_json = "{not json".into()),
        ),
        ("detail_json", Box::new(|c| c.detail_json = String::new())),
        ("at_ms", Box::new(|c| c.at_ms = u64::MAX)),
    ];
    for (field, edit) in bad {
        let mut rec = check("n1", "eu-1", "verified", 5);
        edit(&mut rec);
        match store.record_check(&rec) {
            Err(StoreError::Invalid { field: got, .. }) => assert_eq!(got, field, "{rec:?}"),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
    assert!(
        store.checks_of("n1", 10).expect("list").is_empty(),
        "nothing was written"
    );
    assert!(store.latest_votes("n1").expect("votes").is_empty());
    // Exactly at the limit is fine.
    let mut at_limit = check("n1", "eu-1", "verified", 5);
    at_limit.detail_json = format!("\"{}\"", "x".repeat(MAX_CHECK_DETAIL_BYTES - 2));
    store.record_check(&at_limit).expect("16 KiB of JSON");

    for (node, state, reasons, at, field) in [
        ("n1", "", "{}", 1, "state"),
        ("n1", "a b", "{}", 1, "state"),
        ("n1", "verified", "[", 1, "reasons_json"),
        ("", "verified", "{}", 1, "node_id"),
        ("n1", "verified", "{}", u64::MAX, "at_ms"),
    ] {
        match store.save_verification(node, state, reasons, at) {
            Err(StoreError::Invalid { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
    assert!(matches!(
        store.load_verification("n\0"),
        Err(StoreError::Invalid {
            field: "node_id",
            ..
        })
    ));
    assert_eq!(store.load_verification("n1").expect("load"), None);
}

type CheckEdit = Box<dyn Fn(&mut nearpath_gateway::store::CheckRecordRow)>;

fn a_changed_gpu_set_is_detected_across_records(store: Arc<dyn Store>) {
    use nearpath_gateway::store::GpuSetChange;
    let first = store
        .record_node_gpus("n1", "eu-1", &gpus(&["GPU-bbb", "GPU-aaa"]), 1_000)
        .expect("first");
    assert_eq!(
        first,
        GpuSetChange {
            changed: false,
            previous: vec![],
            first_seen: true
        }
    );
    assert_eq!(
        store.node_gpus("n1").expect("gpus"),
        gpus(&["gpu-aaa", "gpu-bbb"]),
        "stored lowercase, by uuid"
    );
    // The same GPUs in another order and case, with a new driver: not a change of set.
    let mut same = gpus(&["gpu-AAA", "GPU-BBB"]);
    same[0].driver_version = "555.42".into();
    let again = store
        .record_node_gpus("n1", "us-1", &same, 2_000)
        .expect("again");
    assert_eq!(
        again,
        GpuSetChange {
            changed: false,
            previous: vec!["gpu-aaa".into(), "gpu-bbb".into()],
            first_seen: false
        }
    );
    assert_eq!(
        store.node_gpus("n1").expect("gpus")[0].driver_version,
        "555.42"
    );
    // One GPU swapped: a change, with the previous set to compare.
    let swapped = store
        .record_node_gpus("n1", "us-1", &gpus(&["GPU-aaa", "GPU-ccc"]), 3_000)
        .expect("swapped");
    assert!(swapped.changed && !swapped.first_seen);
    assert_eq!(swapped.previous, ["gpu-aaa", "gpu-bbb"]);
    // Every GPU gone (NVML failed, say): a change too; and back again is another.
    let gone = store
        .record_node_gpus("n1", "us-1", &[], 4_000)
        .expect("gone");
    assert!(gone.changed);
    assert!(store.node_gpus("n1").expect("gpus").is_empty());
    let back = store
        .record_node_gpus("n1", "us-1", &gpus(&["GPU-aaa"]), 5_000)
        .expect("back");
    assert!(back.changed && !back.first_seen && back.previous.is_empty());
    // Another node's first record is its own.
    let other = store
        .record_node_gpus("n2", "", &gpus(&["GPU-ddd"]), 5_000)
        .expect("n2");
    assert!(other.first_seen && !other.changed);
}

fn a_gpu_uuid_held_by_two_live_nodes_is_found_for_both(store: Arc<dyn Store>) {
    let holders = |uuids: &[&str], since: u64| -> Vec<(String, String, String, u64)> {
        let uuids: Vec<String> = uuids.iter().map(|u| u.to_string()).collect();
        store
            .gpu_uuid_holders(&uuids, since)
            .expect("holders")
            .into_iter()
            .map(|h| (h.uuid, h.node_id, h.gateway_id, h.seen_at_ms))
            .collect()
    };
    let row =
        |u: &str, n: &str, g: &str, at: u64| (u.to_string(), n.to_string(), g.to_string(), at);
    store
        .record_node_gpus("n1", "eu-1", &gpus(&["GPU-shared", "GPU-one"]), 1_000)
        .expect("n1");
    // n2 copied n1's UUID (in another case) onto a second node, through another gateway.
    store
        .record_node_gpus("n2", "us-1", &gpus(&["gpu-SHARED", "GPU-two"]), 1_100)
        .expect("n2");
    store
        .record_node_gpus("n3", "us-1", &gpus(&["GPU-three"]), 1_100)
        .expect("n3");
    assert_eq!(
        holders(&["GPU-shared", "GPU-one"], 0),
        [
            row("gpu-one", "n1", "eu-1", 1_000),
            row("gpu-shared", "n1", "eu-1", 1_000),
            row("gpu-shared", "n2", "us-1", 1_100),
        ]
    );
    // Only holders seen since the bound count as live.
    assert_eq!(
        holders(&["gpu-shared"], 1_050),
        [row("gpu-shared", "n2", "us-1", 1_100)]
    );
    // A heartbeat's touch renews n1's liveness, and never moves it back.
    assert!(store.touch_node_gpus("n1", 2_000).expect("touch"));
    assert!(store.touch_node_gpus("n1", 1_500).expect("older touch"));
    assert_eq!(
        holders(&["gpu-shared"], 1_050),
        [
            row("gpu-shared", "n1", "eu-1", 2_000),
            row("gpu-shared", "n2", "us-1", 1_100),
        ]
    );
    assert!(!store
        .touch_node_gpus("nobody", 2_000)
        .expect("touch unknown"));
    assert!(holders(&[], 0).is_empty());
    assert!(holders(&["gpu-nobody"], 0).is_empty());
    // Nodes not seen for long are forgotten: n2 and n3 (seen at 1,100) go, n1 stays.
    assert_eq!(store.prune_node_gpus(1_500).expect("prune"), 2);
    assert_eq!(
        holders(&["gpu-shared", "gpu-two", "gpu-three"], 0),
        [row("gpu-shared", "n1", "eu-1", 2_000)]
    );
    assert!(store.node_gpus("n2").expect("n2").is_empty());
    let again = store
        .record_node_gpus("n2", "us-1", &gpus(&["GPU-two"]), 3_000)
        .expect("n2 again");
    assert!(again.first_seen, "a pruned node starts over");
}

/// Regression (issue 14, quick rename): a node that left releases its GPU identities at once,
/// so that the node that takes its GPUs over is not taken for a clone; only the gateway that
/// recorded them may release them, and the set is still there for the GPU-set-change check.
fn a_released_gpu_set_is_no_longer_live_but_is_remembered(store: Arc<dyn Store>) {
    let live = |since: u64| -> Vec<String> {
        store
            .gpu_uuid_holders(&["GPU-moved".to_string()], since)
            .expect("holders")
            .into_iter()
            .map(|h| h.node_id)
            .collect()
    };
    store
        .record_node_gpus("old-name", "eu-1", &gpus(&["GPU-moved"]), 10_000)
        .expect("record");
    assert_eq!(live(9_000), ["old-name"]);
    // Another gateway cannot release what eu-1 recorded.
    assert!(!store
        .release_node_gpus("old-name", "us-1", 1_000)
        .expect("release elsewhere"));
    assert_eq!(live(9_000), ["old-name"]);
    assert!(store
        .release_node_gpus("old-name", "eu-1", 1_000)
        .expect("release"));
    assert!(live(9_000).is_empty(), "released: not live any more");
    assert_eq!(live(0), ["old-name"], "but still recorded");
    // A release never makes a set look newer than it was.
    assert!(store
        .release_node_gpus("old-name", "eu-1", 50_000)
        .expect("release later"));
    assert!(live(9_000).is_empty());
    assert!(!store
        .release_node_gpus("nobody", "eu-1", 1_000)
        .expect("release unknown"));
    // The node comes back: recorded live again, and its set is compared with the one kept.
    let back = store
        .record_node_gpus("old-name", "eu-1", &gpus(&["GPU-other"]), 20_000)
        .expect("back");
    assert!(back.changed && !back.first_seen);
    assert!(store.touch_node_gpus("old-name", 21_000).expect("touch"));
    assert!(live(9_000).is_empty(), "GPU-moved is not in the new set");
}

fn gpu_reports_over_the_limits_are_refused_and_leave_the_set_unchanged(store: Arc<dyn Store>) {
    use nearpath_gateway::store::{MAX_GPUS, MAX_GPU_UUID_BYTES};
    store
        .record_node_gpus("n1", "eu-1", &gpus(&["GPU-a"]), 1_000)
        .expect("n1");
    let many: Vec<_> = (0..=MAX_GPUS).map(|i| gpu(&format!("GPU-{i}"))).collect();
    let long_uuid = format!("GPU-{}", "f".repeat(MAX_GPU_UUID_BYTES));
    let mut control_driver = gpu("GPU-b");
    control_driver.driver_version = "550\u{7}".into();
    let mut huge_model = gpu("GPU-b");
    huge_model.model = "m".repeat(10_000);
    let cases: Vec<(&str, Vec<_>, &str, &str)> = vec![
        ("more GPUs than allowed", many, "n1", "gpus"),
        ("a uuid too long", vec![gpu(&long_uuid)], "n1", "gpus.uuid"),
        ("an empty uuid", vec![gpu("")], "n1", "gpus.uuid"),
        ("a uuid with a space", vec![gpu("GPU a")], "n1", "gpus.uuid"),
        ("a uuid with NUL", vec![gpu("GPU-\0")], "n1", "gpus.uuid"),
        (
            "one GPU twice",
            vec![gpu("GPU-b"), gpu("gpu-B")],
            "n1",
            "gpus.uuid",
        ),
        (
            "a control character",
            vec![control_driver],
            "n1",
            "gpus.driver_version",
        ),
        ("a huge model name", vec![huge_model], "n1", "gpus.model"),
        ("a NUL node id", vec![gpu("GPU-b")], "n\0", "node_id"),
    ];
    for (what, list, node, field) in cases {
        match store.record_node_gpus(node, "eu-1", &list, 2_000) {
            Err(StoreError::Invalid { field: got, .. }) => assert_eq!(got, field, "{what}"),
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
    }
    match store.record_node_gpus("n1", "not a gateway", &gpus(&["GPU-b"]), 2_000) {
        Err(StoreError::Invalid {
            field: "gateway_id",
            ..
        }) => {}
        other => panic!("bad gateway id: expected Invalid, got {other:?}"),
    }
    match store.record_node_gpus("n1", "eu-1", &gpus(&["GPU-b"]), u64::MAX) {
        Err(StoreError::Invalid {
            field: "seen_at_ms",
            ..
        }) => {}
        other => panic!("huge time: expected Invalid, got {other:?}"),
    }
    assert_eq!(
        store.node_gpus("n1").expect("gpus"),
        gpus(&["gpu-a"]),
        "unchanged"
    );
    // Exactly MAX_GPUS is allowed.
    let full: Vec<_> = (0..MAX_GPUS).map(|i| gpu(&format!("GPU-{i:02}"))).collect();
    let change = store
        .record_node_gpus("n1", "eu-1", &full, 3_000)
        .expect("64 GPUs");
    assert!(change.changed);
    assert_eq!(store.node_gpus("n1").expect("gpus").len(), MAX_GPUS);
    let query: Vec<String> = (0..=MAX_GPUS).map(|i| format!("GPU-{i}")).collect();
    assert!(matches!(
        store.gpu_uuid_holders(&query, 0),
        Err(StoreError::Invalid { field: "uuids", .. })
    ));
    assert!(matches!(
        store.gpu_uuid_holders(&[long_uuid], 0),
        Err(StoreError::Invalid {
            field: "gpus.uuid",
            ..
        })
    ));
    assert!(matches!(
        store.touch_node_gpus("n1", u64::MAX),
        Err(StoreError::Invalid {
            field: "seen_at_ms",
            ..
        })
    ));
}

fn a_verification_snapshot_is_replaced_only_by_a_newer_one(store: Arc<dyn Store>) {
    use nearpath_gateway::store::VerificationSnapshot;
    let snap = |state: &str, reasons: &str, at: u64| VerificationSnapshot {
        node_id: "n1".into(),
        state: state.into(),
        reasons_json: reasons.into(),
        at_ms: at,
    };
    assert_eq!(store.load_verification("n1").expect("load"), None);
    let reasons = r#"["gpu_uuid_duplicated","weights_exceed_vram"]"#;
    store
        .save_verification("n1", "quarantined", reasons, 2_000)
        .expect("save");
    assert_eq!(
        store.load_verification("n1").expect("load"),
        Some(snap("quarantined", reasons, 2_000))
    );
    // A stale writer (an older decision arriving late) does not undo the quarantine.
    store
        .save_verification("n1", "verified", "[]", 1_000)
        .expect("stale save");
    assert_eq!(
        store.load_verification("n1").expect("load"),
        Some(snap("quarantined", reasons, 2_000))
    );
    store
        .save_verification("n1", "verified", "[]", 3_000)
        .expect("newer save");
    assert_eq!(
        store.load_verification("n1").expect("load"),
        Some(snap("verified", "[]", 3_000))
    );
    assert_eq!(store.load_verification("n2").expect("other node"), None);
}

/// A restart must not forget a quarantine, a vote or a node's GPUs.
#[test]
fn checker_records_survive_reopening_the_sqlite_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    {
        let store = SqliteStore::open(&path).expect("open");
        store
            .record_check(&check("n1", "", "quarantined", 1_000))
            .expect("check");
        store
            .record_node_gpus("n1", "", &gpus(&["GPU-a"]), 1_000)
            .expect("gpus");
        store
            .save_verification("n1", "quarantined", r#"["gpu_uuid_duplicated"]"#, 1_000)
            .expect("verification");
    }
    let store = SqliteStore::open(&path).expect("reopen");
    assert_eq!(
        store.checks_of("n1", 10).expect("checks"),
        [check("n1", "", "quarantined", 1_000)]
    );
    assert_eq!(store.latest_votes("n1").expect("votes").len(), 1);
    assert_eq!(
        store
            .load_verification("n1")
            .expect("load")
            .map(|s| s.state),
        Some("quarantined".to_string())
    );
    let change = store
        .record_node_gpus("n1", "", &gpus(&["GPU-b"]), 2_000)
        .expect("gpus again");
    assert!(!change.first_seen && change.changed, "{change:?}");
    assert_eq!(change.previous, ["gpu-a"]);
}

/// Two gateways (two pools on one database) record checks of one node at once: every record
/// is kept and each gateway ends with its own newest vote.
#[test]
fn pg_two_gateways_recording_checks_of_one_node_at_once_each_keep_their_vote() {
    let Some(url) = pg_url("pg_two_gateways_checks") else {
        return;
    };
    let gateways: Vec<(String, Arc<dyn Store>)> = ["eu-1", "us-1"]
        .iter()
        .map(|g| (g.to_string(), Arc::new(pg_open(&url)) as Arc<dyn Store>))
        .collect();
    let per_gateway = 100u64;
    let barrier = Arc::new(Barrier::new(gateways.len()));
    let threads: Vec<_> = gateways
        .iter()
        .map(|(g, store)| {
            let (g, store, barrier) = (g.clone(), Arc::clone(store), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                for i in 0..per_gateway {
                    store
                        .record_check(&check("n1", &g, "verified", 1_000 + i))
                        .expect("record");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let store = &gateways[0].1;
    assert_eq!(
        store.checks_of("n1", 1000).expect("list").len() as u64,
        per_gateway * 2
    );
    assert_eq!(
        votes(store, "n1"),
        [
            vote("eu-1", "verified", 1_000 + per_gateway - 1),
            vote("us-1", "verified", 1_000 + per_gateway - 1),
        ]
    );
}

/// TLS to PostgreSQL (`[store] ca_file`, `sslmode=require`): a server with a certificate for
/// 127.0.0.1 is reached over TLS when its CA is configured; the same URL without the CA (the
/// system's roots, which do not hold it) is refused with a certificate error, which also shows
/// the connection really is TLS; `sslmode=disable` connects in plain text.
#[test]
fn pg_tls_is_checked_against_the_configured_ca_and_refused_without_it() {
    if !pg::PgServer::available() {
        return;
    }
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let server = pg::PgServer::try_start_tls(
        &certified.cert.pem(),
        &certified.signing_key.serialize_pem(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let url = server.new_database("tls");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("pg-ca.pem");
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let timeout = Duration::from_secs(20);

    let tls_url = format!("{url}?sslmode=require");
    let store = PgStore::open_tls(&tls_url, 2, timeout, Some(&ca))
        .unwrap_or_else(|e| panic!("TLS with the CA: {e}; log: {}", server.log()));
    assert!(store.location().ends_with("(TLS)"), "{}", store.location());
    store
        .create_operator("op-tls", KycStatus::Verified)
        .unwrap();
    assert_eq!(store.list_operators().unwrap().len(), 1);
    drop(store);
    // libpq's spelling of the same check.
    let verify_full = format!("{url}?sslmode=verify-full");
    PgStore::open_tls(&verify_full, 1, timeout, Some(&ca)).expect("verify-full reads as require");

    let Err(refused) = PgStore::open_tls(&tls_url, 1, Duration::from_secs(5), None) else {
        panic!("a server whose CA is not trusted is refused");
    };
    let shown = refused.to_string();
    assert!(
        shown.contains("certificate") || shown.contains("UnknownIssuer"),
        "{shown}"
    );
    assert!(
        refused.is_retryable(),
        "an unreachable store is retryable: {shown}"
    );

    // Another server name than the certificate's is refused too.
    let wrong_name = certified_for_other_name();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, wrong_name).unwrap();
    assert!(PgStore::open_tls(&tls_url, 1, Duration::from_secs(5), Some(&other)).is_err());

    let plain = format!("{url}?sslmode=disable");
    let store = PgStore::open_tls(&plain, 1, timeout, None).expect("plain connection");
    assert_eq!(store.list_operators().unwrap().len(), 1);
}

/// A certificate (as PEM) that no server of these tests presents.
fn certified_for_other_name() -> String {
    rcgen::generate_simple_self_signed(vec!["db.example.net".into()])
        .unwrap()
        .cert
        .pem()
}
