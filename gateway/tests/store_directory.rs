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
