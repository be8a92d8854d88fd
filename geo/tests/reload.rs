//! Hot reload: replacement by rename under concurrent lookups, change detection, and refusal
//! of corrupt replacements.

mod common;

use common::*;
use nearpath_geo::{GeoDb, GeoError, ReloadOutcome};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

/// Two databases that disagree about the probe address: FR in one, DE in the other.
fn variant(country: &'static str) -> Vec<u8> {
    city_db(&[
        ("203.0.113.0/24", Rec::country(country)),
        ("2001:db8::/32", Rec::country(country)),
        ("8.8.8.0/24", Rec::country("US")),
    ])
}

/// Writes `bytes` to a temporary name in the same directory, then renames it over `path`,
/// as operators are told to.
fn replace_by_rename(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("mmdb.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn country(db: &GeoDb, addr: &str) -> Option<String> {
    db.lookup(addr.parse().unwrap())
        .country
        .map(|c| c.as_str().to_string())
}

#[test]
fn reload_by_rename_under_concurrent_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("city.mmdb");
    let fr = variant("FR");
    let de = variant("DE");
    std::fs::write(&path, &fr).unwrap();
    let db = Arc::new(GeoDb::open(&geo_config(Some(path.clone()), None)).unwrap());

    const READERS: usize = 2;
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let odd = Arc::new(AtomicU64::new(0));
    // Readers start before the first reload, so that reloads really overlap lookups.
    let started = Arc::new(Barrier::new(READERS + 1));
    let mut readers = Vec::new();
    for t in 0..READERS {
        let (db, stop, lookups, odd, started) = (
            db.clone(),
            stop.clone(),
            lookups.clone(),
            odd.clone(),
            started.clone(),
        );
        readers.push(std::thread::spawn(move || {
            let probes: [IpAddr; 3] = [
                "203.0.113.7".parse().unwrap(),
                "2001:db8::7".parse().unwrap(),
                "8.8.8.8".parse().unwrap(),
            ];
            started.wait();
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let idx = i % probes.len();
                i += 1;
                let c = db
                    .lookup(probes[idx])
                    .country
                    .map(|c| c.as_str().to_string());
                let ok = match idx {
                    2 => c.as_deref() == Some("US"),
                    _ => matches!(c.as_deref(), Some("FR") | Some("DE")),
                };
                if !ok {
                    odd.fetch_add(1, Ordering::Relaxed);
                }
                lookups.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    started.wait();

    const RELOADS: usize = 200;
    for n in 0..RELOADS {
        let (bytes, want) = if n % 2 == 0 { (&de, "DE") } else { (&fr, "FR") };
        replace_by_rename(&path, bytes);
        let report = if n % 4 < 2 {
            db.reload().unwrap()
        } else {
            db.reload_if_changed().unwrap()
        };
        assert!(report.changed(), "reload {n}: {report:?}");
        // Once reload returns, every new lookup sees the new file.
        assert_eq!(
            country(&db, "203.0.113.7").as_deref(),
            Some(want),
            "reload {n}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let total = lookups.load(Ordering::Relaxed);
    assert_eq!(
        odd.load(Ordering::Relaxed),
        0,
        "odd answers out of {total} lookups"
    );
    assert!(
        total > RELOADS as u64,
        "readers barely ran: {total} lookups"
    );
    assert_eq!(db.info().reloads, RELOADS as u64);
    assert_eq!(db.info().decode_errors, 0);
}

#[test]
fn reload_if_changed_only_reloads_changed_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("city.mmdb");
    std::fs::write(&path, variant("FR")).unwrap();
    let anon = dir.path().join("anon.mmdb");
    std::fs::copy(testdata("GeoIP2-Anonymous-IP-Test.mmdb"), &anon).unwrap();
    let db = GeoDb::open(&geo_config(Some(path.clone()), Some(anon.clone()))).unwrap();

    let r = db.reload_if_changed().unwrap();
    assert_eq!(r.database, ReloadOutcome::Unchanged);
    assert_eq!(r.anonymous_ip_database, ReloadOutcome::Unchanged);
    assert!(!r.changed());

    replace_by_rename(&path, &variant("DE"));
    let r = db.reload_if_changed().unwrap();
    match &r.database {
        ReloadOutcome::Reloaded { previous, current } => {
            assert_eq!(previous.source, path.display().to_string());
            assert_eq!(current.database_type, "GeoIP2-City");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.anonymous_ip_database, ReloadOutcome::Unchanged);
    assert_eq!(country(&db, "203.0.113.7").as_deref(), Some("DE"));
    // The anonymous database kept working across the partial reload.
    assert!(
        db.lookup("81.2.69.143".parse().unwrap())
            .anonymous
            .tor_exit_node
    );
    assert!(!db.reload_if_changed().unwrap().changed());

    // A forced reload reopens both even though nothing changed.
    let r = db.reload().unwrap();
    assert!(matches!(r.database, ReloadOutcome::Reloaded { .. }));
    assert!(matches!(
        r.anonymous_ip_database,
        ReloadOutcome::Reloaded { .. }
    ));
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["database"]["outcome"], "reloaded");

    // The embedded database has nothing to reload.
    let emb = GeoDb::embedded().unwrap();
    let r = emb.reload().unwrap();
    assert_eq!(r.database, ReloadOutcome::Embedded);
    assert_eq!(r.anonymous_ip_database, ReloadOutcome::NotConfigured);
}

#[test]
fn corrupt_replacement_is_refused_and_old_database_stays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("city.mmdb");
    let fr = variant("FR");
    std::fs::write(&path, &fr).unwrap();
    let db = GeoDb::open(&geo_config(Some(path.clone()), None)).unwrap();
    assert_eq!(country(&db, "203.0.113.7").as_deref(), Some("FR"));

    // A truncated copy of a valid database, renamed into place.
    let de = variant("DE");
    replace_by_rename(&path, &de[..de.len() * 2 / 3]);
    for attempt in [db.reload(), db.reload_if_changed()] {
        let err = attempt.unwrap_err();
        assert!(matches!(err, GeoError::Corrupt { .. }), "{err}");
        assert_eq!(err.path(), Some(path.as_path()));
        assert!(err.to_string().contains("city.mmdb"), "{err}");
        assert_eq!(country(&db, "203.0.113.7").as_deref(), Some("FR"));
    }
    // The file vanishing (e.g. mid-rename by a careless script) is an I/O error, retryable.
    std::fs::remove_file(&path).unwrap();
    let err = db.reload_if_changed().unwrap_err();
    assert!(matches!(err, GeoError::Io { .. }), "{err}");
    assert!(err.retry_may_help());
    assert_eq!(country(&db, "203.0.113.7").as_deref(), Some("FR"));
    // A wrong kind of database, renamed into place, is refused too.
    replace_by_rename(
        &path,
        &std::fs::read(testdata("GeoLite2-ASN-Test.mmdb")).unwrap(),
    );
    assert!(matches!(db.reload(), Err(GeoError::WrongType { .. })));
    // A good file afterwards is taken.
    replace_by_rename(&path, &de);
    assert!(db.reload_if_changed().unwrap().changed());
    assert_eq!(country(&db, "203.0.113.7").as_deref(), Some("DE"));
    assert_eq!(db.info().reloads, 1);
}
