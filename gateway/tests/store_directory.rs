//! The federation's gateway and node directories (issue 13) through the `Store` trait. Each
//! check is a function over `&dyn Store`, run against SQLite here and against PostgreSQL where
//! the PostgreSQL test harness is available.

use std::sync::Arc;

mod directory_checks;

use directory_checks::*;
use nearpath_gateway::store::{PgStore, SqliteStore, Store};
use std::time::Duration;

fn sqlite() -> Arc<dyn Store> {
    Arc::new(SqliteStore::open_in_memory().expect("open in-memory store"))
}

// The throwaway PostgreSQL server of the end-to-end tests, included by path (as in `store.rs`).
#[path = "../../tests/src/pg.rs"]
#[allow(dead_code)]
mod pg;

/// A PostgreSQL store on a fresh database, or `None` (after printing why) when PostgreSQL is
/// not installed and `CI` is not set.
fn postgres(test: &str) -> Option<Arc<dyn Store>> {
    pg::PgServer::shared().map(|server| {
        let url = server.new_database(test);
        Arc::new(PgStore::open(&url, 4, Duration::from_secs(20)).expect("open PostgreSQL store"))
            as Arc<dyn Store>
    })
}

/// Runs each check of `directory_checks` against SQLite (`sqlite_suite::`) and PostgreSQL
/// (`pg_suite::`, a database per test).
macro_rules! directory_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite_suite {
            $(
                #[test]
                fn $name() {
                    super::$name(super::sqlite().as_ref())
                }
            )*
        }
        mod pg_suite {
            $(
                #[test]
                fn $name() {
                    if let Some(store) = super::postgres(concat!("dir_", stringify!($name))) {
                        super::$name(store.as_ref())
                    }
                }
            )*
        }
    };
}

directory_suite!(
    heartbeats_renew_and_expired_leases_stay_listed_as_expired,
    a_live_holder_of_the_id_with_another_pin_refuses_the_join,
    publishing_replaces_the_gateways_whole_set,
    a_node_that_moved_keeps_the_newer_entry,
    hostile_directory_entries_are_refused_with_invalid,
    encoders_are_published_and_hostile_encoder_lists_are_refused,
    subdivisions_are_published_and_forged_ones_refused,
);

#[test]
fn sqlite_directories_survive_reopening_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.db");
    {
        let store = SqliteStore::open(&path).expect("open");
        store
            .gateway_heartbeat(&gw("eu-1", PIN_A, 10_000, 3_000))
            .expect("heartbeat");
        store
            .publish_nodes("eu-1", &[node("n1", "eu-1", 100)])
            .expect("publish");
    }
    let store = SqliteStore::open(&path).expect("reopen");
    assert_eq!(store.list_gateways().expect("list").len(), 1);
    assert_eq!(
        ids(&store.list_node_directory().expect("list")),
        [pair("n1", "eu-1")]
    );
}

/// A node published by a gateway of the previous release (before the node directory carried
/// encoders) reads as H.264 only once the store migrates, and a value no gateway writes (put
/// straight into the database) reads as H.264 only without failing the listing: SQLite.
#[test]
fn sqlite_rows_from_before_the_encoders_column_read_as_h264_only() {
    use nearpath_protocol::message::VideoCodec;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.db");
    {
        let store = SqliteStore::open(&path).expect("open");
        let mut n = node("old-1", "eu-1", 100);
        n.encoders = vec![nearpath_gateway::store::DirEncoder {
            codec: "hevc".into(),
            implementation: "x265".into(),
        }];
        store
            .publish_nodes("eu-1", &[n, node("damaged-1", "eu-1", 100)])
            .expect("publish");
    }
    {
        // Back to the schema before migrations 11 (encoders), 12 (model capabilities) and
        // 13 (subdivision), the rows still there.
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        conn.execute_batch(
            "ALTER TABLE node_directory DROP COLUMN encoders; \
             ALTER TABLE node_directory DROP COLUMN model_caps; \
             ALTER TABLE node_directory DROP COLUMN subdivision",
        )
        .expect("drop columns");
        conn.pragma_update(
            None,
            "user_version",
            nearpath_gateway::store::SCHEMA_VERSION - 3,
        )
        .expect("user_version");
    }
    let store = SqliteStore::open(&path).expect("reopen and migrate");
    let listed = store.list_node_directory().expect("list");
    assert_eq!(
        ids(&listed),
        [pair("damaged-1", "eu-1"), pair("old-1", "eu-1")]
    );
    for n in &listed {
        assert!(
            n.encoders.is_empty() && n.model_caps.is_empty() && n.subdivision.is_none(),
            "{n:?}"
        );
        assert!(n.encodes(VideoCodec::H264) && !n.encodes(VideoCodec::Hevc));
    }
    let conn = rusqlite::Connection::open(&path).expect("raw open");
    for damaged in [
        "not json".to_string(),
        format!(
            "[{}]",
            r#"{"codec":"hevc","implementation":"x"},"#.repeat(3_000)
        ),
    ] {
        conn.execute(
            "UPDATE node_directory SET encoders = ?1 WHERE node_id = 'damaged-1'",
            [&damaged],
        )
        .expect("damage");
        let listed = store
            .list_node_directory()
            .expect("a damaged row does not fail the list");
        assert!(listed.iter().all(|n| n.encoders.is_empty()), "{listed:?}");
    }
}

/// The same on PostgreSQL: an old row reads as H.264 only after migration 8, a damaged value
/// as H.264 only.
#[test]
fn pg_rows_from_before_the_encoders_column_read_as_h264_only() {
    use nearpath_protocol::message::VideoCodec;
    let Some(server) = pg::PgServer::shared() else {
        return;
    };
    let url = server.new_database("dir_encoders_migration");
    let open = || PgStore::open(&url, 2, Duration::from_secs(20)).expect("open PostgreSQL store");
    let mut hevc = node("old-1", "eu-1", 100);
    hevc.encoders = vec![nearpath_gateway::store::DirEncoder {
        codec: "hevc".into(),
        implementation: "x265".into(),
    }];
    open()
        .publish_nodes("eu-1", &[hevc, node("damaged-1", "eu-1", 100)])
        .expect("publish");
    let mut raw = postgres::Client::connect(&url, postgres::NoTls).expect("raw connect");
    raw.batch_execute(&format!(
        "ALTER TABLE node_directory DROP COLUMN encoders; \
         ALTER TABLE node_directory DROP COLUMN model_caps; \
         ALTER TABLE node_directory DROP COLUMN subdivision; \
         UPDATE nearpath_schema SET version = {} WHERE id = 1",
        nearpath_gateway::store::pg::PG_SCHEMA_VERSION - 3
    ))
    .expect("back to the previous schema");
    let store = open();
    let listed = store.list_node_directory().expect("list");
    assert_eq!(
        ids(&listed),
        [pair("damaged-1", "eu-1"), pair("old-1", "eu-1")]
    );
    for n in &listed {
        assert!(
            n.encoders.is_empty() && n.model_caps.is_empty() && n.subdivision.is_none(),
            "{n:?}"
        );
        assert!(n.encodes(VideoCodec::H264) && !n.encodes(VideoCodec::Hevc));
    }
    raw.execute(
        "UPDATE node_directory SET encoders = $1 WHERE node_id = 'damaged-1'",
        &[&"[{\"codec\": 7}]"],
    )
    .expect("damage");
    let listed = store
        .list_node_directory()
        .expect("a damaged row does not fail the list");
    assert!(listed.iter().all(|n| n.encoders.is_empty()), "{listed:?}");
}

/// Values no gateway writes, put straight into the `subdivision` column: each reads as no
/// subdivision (the node is then judged by its country and coordinates) without failing the
/// listing.
const DAMAGED_SUBDIVISIONS: &[&str] = &["PL-MZ", "ua-43", "UA-", "garbage", "UA-43\n", ""];

/// A node published before the directory carried subdivisions reads as having none once the
/// store migrates (SQLite migration 13), and a damaged or forged value reads as none.
#[test]
fn sqlite_subdivisions_from_before_the_column_or_damaged_read_as_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.db");
    let mut ua = node("ua-1", "eu-1", 100);
    ua.country = Some("UA".into());
    ua.subdivision = Some("UA-43".into());
    {
        let store = SqliteStore::open(&path).expect("open");
        store.publish_nodes("eu-1", &[ua.clone()]).expect("publish");
        assert_eq!(store.list_node_directory().expect("list"), [ua.clone()]);
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        conn.execute_batch("ALTER TABLE node_directory DROP COLUMN subdivision")
            .expect("drop column");
        conn.pragma_update(
            None,
            "user_version",
            nearpath_gateway::store::SCHEMA_VERSION - 1,
        )
        .expect("user_version");
    }
    let store = SqliteStore::open(&path).expect("reopen and migrate");
    let listed = store.list_node_directory().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].subdivision, None, "an old row has none");
    let conn = rusqlite::Connection::open(&path).expect("raw open");
    for damaged in DAMAGED_SUBDIVISIONS {
        conn.execute(
            "UPDATE node_directory SET subdivision = ?1 WHERE node_id = 'ua-1'",
            [damaged],
        )
        .expect("damage");
        let listed = store
            .list_node_directory()
            .expect("a damaged row does not fail the list");
        assert_eq!(listed[0].subdivision, None, "{damaged:?}");
    }
    conn.execute(
        "UPDATE node_directory SET subdivision = 'UA-30' WHERE node_id = 'ua-1'",
        [],
    )
    .expect("write");
    let listed = store.list_node_directory().expect("list");
    assert_eq!(listed[0].subdivision.as_deref(), Some("UA-30"));
}

/// The same on PostgreSQL (migration 10).
#[test]
fn pg_subdivisions_from_before_the_column_or_damaged_read_as_none() {
    let Some(server) = pg::PgServer::shared() else {
        return;
    };
    let url = server.new_database("dir_subdivision_migration");
    let open = || PgStore::open(&url, 2, Duration::from_secs(20)).expect("open PostgreSQL store");
    let mut ua = node("ua-1", "eu-1", 100);
    ua.country = Some("UA".into());
    ua.subdivision = Some("UA-43".into());
    {
        let store = open();
        store.publish_nodes("eu-1", &[ua.clone()]).expect("publish");
        assert_eq!(store.list_node_directory().expect("list"), [ua.clone()]);
    }
    let mut raw = postgres::Client::connect(&url, postgres::NoTls).expect("raw connect");
    raw.batch_execute(&format!(
        "ALTER TABLE node_directory DROP COLUMN subdivision; \
         UPDATE nearpath_schema SET version = {} WHERE id = 1",
        nearpath_gateway::store::pg::PG_SCHEMA_VERSION - 1
    ))
    .expect("back to the previous schema");
    let store = open();
    let listed = store.list_node_directory().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].subdivision, None, "an old row has none");
    for damaged in DAMAGED_SUBDIVISIONS {
        raw.execute(
            "UPDATE node_directory SET subdivision = $1 WHERE node_id = 'ua-1'",
            &[damaged],
        )
        .expect("damage");
        let listed = store
            .list_node_directory()
            .expect("a damaged row does not fail the list");
        assert_eq!(listed[0].subdivision, None, "{damaged:?}");
    }
}
