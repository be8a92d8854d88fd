//! The federation's gateway and node directories (issue 13) through the `Store` trait. Each
//! check is a function over `&dyn Store`, run against SQLite here and against PostgreSQL where
//! the PostgreSQL test harness is available.

use std::sync::Arc;

mod directory_checks;

use directory_checks::*;
use nearpath_gateway::store::{SqliteStore, Store};

fn sqlite() -> Arc<dyn Store> {
    Arc::new(SqliteStore::open_in_memory().expect("open in-memory store"))
}

// ---------------------------------------------------------------------------------------------
// SQLite.

#[test]
fn sqlite_heartbeats_renew_and_expired_leases_stay_listed_as_expired() {
    heartbeats_renew_and_expired_leases_stay_listed_as_expired(sqlite().as_ref());
}

#[test]
fn sqlite_a_live_holder_of_the_id_with_another_pin_refuses_the_join() {
    a_live_holder_of_the_id_with_another_pin_refuses_the_join(sqlite().as_ref());
}

#[test]
fn sqlite_publishing_replaces_the_gateways_whole_set() {
    publishing_replaces_the_gateways_whole_set(sqlite().as_ref());
}

#[test]
fn sqlite_a_node_that_moved_keeps_the_newer_entry() {
    a_node_that_moved_keeps_the_newer_entry(sqlite().as_ref());
}

#[test]
fn sqlite_hostile_directory_entries_are_refused_with_invalid() {
    hostile_directory_entries_are_refused_with_invalid(sqlite().as_ref());
}

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
