//! GeoIP and geofence benchmarks.
//!
//! (a) `lookup/*`: `GeoDb::lookup` (country + centroid + continent) on the embedded database
//!     for 10,000 random public addresses (5,000 IPv4, 5,000 IPv6, each with a record) against
//!     a bare `maxminddb` lookup + decode of the same `country_code` field of the same
//!     addresses, in the same run. One iteration = all 10,000 addresses.
//! (b) `decision/*`: client lookup + `Policy::check_serve` against a precomputed node
//!     location, default rules, controlled and uncontrolled class; 10,000 addresses per
//!     iteration.
//! `decision_one/*`: the same for one address at a time (warm caches), per decision.
//! `interleaved_lookup` (printed): (a) with the two sides alternating pass by pass, for a
//!     ratio that load drift on a shared machine cannot skew.
//! (c) After the criterion groups: hot reload of a file copy of the embedded database (by
//!     rename) while a thread looks addresses up; prints reloads, lookups, wrong answers and
//!     lookup latency percentiles with and without reloads going on (skip it with
//!     `GEO_BENCH_SKIP_RELOAD=1`).
//!
//! Run: `cargo bench -p nearpath-geo --bench geo -- --warm-up-time 1 --measurement-time 3`.

use criterion::{criterion_group, Criterion, Throughput};
use maxminddb::Reader;
use nearpath_config::{GeoConfig, GeofenceConfig, WorkloadKind};
use nearpath_geo::{embedded_database_bytes, Country, GeoDb, Location, Policy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PER_FAMILY: usize = 5_000;

#[derive(Deserialize)]
struct Flat<'a> {
    #[serde(borrow)]
    country_code: Option<&'a str>,
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    !(a.is_private()
        || a.is_loopback()
        || a.is_link_local()
        || a.is_multicast()
        || a.is_broadcast()
        || a.is_documentation()
        || a.is_unspecified()
        || o[0] == 0
        || o[0] >= 240
        || (o[0] == 100 && (o[1] & 0xC0) == 64))
}

/// 5,000 IPv4 and 5,000 IPv6 random public addresses that the embedded database has a
/// record for, interleaved; seeded so every run measures the same addresses.
fn addresses(reader: &Reader<&'static [u8]>) -> Vec<IpAddr> {
    let mut rng = StdRng::seed_from_u64(0x6e65_6172_7061_7468);
    let has_record = |ip: IpAddr| reader.lookup(ip).map(|r| r.has_data()).unwrap_or(false);
    let mut v4 = Vec::with_capacity(PER_FAMILY);
    while v4.len() < PER_FAMILY {
        let a = Ipv4Addr::from(rng.random::<u32>());
        if is_public_v4(a) && has_record(IpAddr::V4(a)) {
            v4.push(IpAddr::V4(a));
        }
    }
    let mut v6 = Vec::with_capacity(PER_FAMILY);
    while v6.len() < PER_FAMILY {
        // Global unicast 2000::/3.
        let bits = (rng.random::<u128>() >> 3) | (1u128 << 125);
        let a = Ipv6Addr::from(bits);
        if has_record(IpAddr::V6(a)) {
            v6.push(IpAddr::V6(a));
        }
    }
    v4.into_iter().zip(v6).flat_map(|(a, b)| [a, b]).collect()
}

fn bench_lookup(c: &mut Criterion) {
    let reader = Reader::from_source(embedded_database_bytes()).expect("embedded database");
    let addrs = addresses(&reader);
    let db = GeoDb::embedded().expect("embedded database");

    // Both sides must agree on every address, or the comparison is meaningless.
    for ip in &addrs {
        let bare = reader
            .lookup(*ip)
            .ok()
            .and_then(|r| r.decode::<Flat>().ok().flatten())
            .and_then(|f| f.country_code);
        let ours = db.lookup(*ip).country;
        assert_eq!(ours.as_ref().map(Country::as_str), bare, "{ip}");
    }

    let mut g = c.benchmark_group("lookup");
    g.throughput(Throughput::Elements(addrs.len() as u64));
    g.bench_function("bare_maxminddb_country_10k", |b| {
        b.iter(|| {
            for ip in &addrs {
                let r = reader.lookup(black_box(*ip)).unwrap();
                black_box(r.decode::<Flat>().unwrap());
            }
        })
    });
    g.bench_function("geodb_lookup_10k", |b| {
        b.iter(|| {
            for ip in &addrs {
                black_box(db.lookup(black_box(*ip)));
            }
        })
    });
    g.finish();
}

fn bench_decision(c: &mut Criterion) {
    let reader = Reader::from_source(embedded_database_bytes()).expect("embedded database");
    let addrs = addresses(&reader);
    let db = GeoDb::embedded().expect("embedded database");
    let policy = Policy::compile(&GeofenceConfig::default()).expect("default policy");
    let node: Location = db.lookup("8.8.8.8".parse().unwrap());
    let h100 = policy.class_id("h100");
    let rtx = policy.class_id("rtx3080");

    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(addrs.len() as u64));
    for (name, class) in [
        ("lookup_and_check_h100_10k", h100),
        ("lookup_and_check_rtx3080_10k", rtx),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut allowed = 0u32;
                for ip in &addrs {
                    let client = db.lookup(black_box(*ip));
                    let d = policy.check_serve(&client, &node, class, WorkloadKind::Inference);
                    allowed += d.is_allowed() as u32;
                }
                black_box(allowed)
            })
        });
    }
    g.bench_function("check_only_h100_10k", |b| {
        let locs: Vec<Location> = addrs.iter().map(|ip| db.lookup(*ip)).collect();
        b.iter(|| {
            let mut allowed = 0u32;
            for client in &locs {
                let d = policy.check_serve(black_box(client), &node, h100, WorkloadKind::Inference);
                allowed += d.is_allowed() as u32;
            }
            black_box(allowed)
        })
    });
    g.finish();

    // One decision at a time for a single address (warm caches): the per-decision latency a
    // request sees when its client's range is hot, deny and allow paths.
    let mut g = c.benchmark_group("decision_one");
    for (name, addr) in [
        ("allow_us_h100", "8.8.8.8"),
        ("deny_cn_h100", "114.114.114.114"),
    ] {
        let ip: IpAddr = addr.parse().unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let client = db.lookup(black_box(ip));
                policy.check_serve(&client, &node, h100, WorkloadKind::Inference)
            })
        });
    }
    let ip: IpAddr = "8.8.8.8".parse().unwrap();
    g.bench_function("bare_maxminddb_us", |b| {
        b.iter(|| {
            let r = reader.lookup(black_box(ip)).unwrap();
            black_box(r.decode::<Flat>().unwrap());
        })
    });
    g.finish();
}

/// (a) again, interleaved: alternate one pass of each over the 10,000 addresses, 200 times, and
/// compare the medians. Criterion measures the two one after the other, so load from other
/// processes on a shared machine can favour either; alternating cancels that drift.
fn interleaved_lookup_ratio() {
    const ROUNDS: usize = 200;
    let reader = Reader::from_source(embedded_database_bytes()).expect("embedded database");
    let addrs = addresses(&reader);
    let db = GeoDb::embedded().expect("embedded database");
    let (mut bare, mut ours) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    for round in 0..ROUNDS * 2 {
        let t = Instant::now();
        if round % 2 == 0 {
            for ip in &addrs {
                let r = reader.lookup(black_box(*ip)).unwrap();
                black_box(r.decode::<Flat>().unwrap());
            }
            bare.push(t.elapsed() / addrs.len() as u32);
        } else {
            for ip in &addrs {
                black_box(db.lookup(black_box(*ip)));
            }
            ours.push(t.elapsed() / addrs.len() as u32);
        }
    }
    bare.sort();
    ours.sort();
    let (b50, o50) = (percentile(&bare, 0.5), percentile(&ours, 0.5));
    println!(
        "interleaved_lookup: ns/lookup bare p25={} p50={} p75={} | geodb p25={} p50={} p75={} | ratio p50 {:.2} (+{} ns)",
        percentile(&bare, 0.25).as_nanos(),
        b50.as_nanos(),
        percentile(&bare, 0.75).as_nanos(),
        percentile(&ours, 0.25).as_nanos(),
        o50.as_nanos(),
        percentile(&ours, 0.75).as_nanos(),
        o50.as_secs_f64() / b50.as_secs_f64(),
        o50.as_nanos() as i128 - b50.as_nanos() as i128,
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// (c): hot reload under lookup load, printed rather than measured by criterion.
fn reload_under_load() {
    const RELOADS: usize = 10;
    let reader = Reader::from_source(embedded_database_bytes()).expect("embedded database");
    let addrs: Vec<IpAddr> = addresses(&reader).into_iter().take(2_000).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("geo.mmdb");
    std::fs::write(&path, embedded_database_bytes()).expect("write db");
    let db = Arc::new(
        GeoDb::open(&GeoConfig {
            database: Some(path.clone()),
            ..GeoConfig::default()
        })
        .expect("open copy"),
    );
    let expected: Vec<Option<Country>> = addrs.iter().map(|ip| db.lookup(*ip).country).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let reloading = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let reader_thread = {
        let (db, stop, reloading, lookups, wrong) = (
            db.clone(),
            stop.clone(),
            reloading.clone(),
            lookups.clone(),
            wrong.clone(),
        );
        let addrs = addrs.clone();
        std::thread::spawn(move || {
            let (mut quiet, mut busy) = (Vec::new(), Vec::new());
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let k = i % addrs.len();
                let during = reloading.load(Ordering::Relaxed);
                let t = Instant::now();
                let loc = db.lookup(addrs[k]);
                let dt = t.elapsed();
                if loc.country != expected[k] {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
                if i & 15 == 0 {
                    if during {
                        busy.push(dt)
                    } else {
                        quiet.push(dt)
                    }
                }
                i += 1;
            }
            lookups.store(i as u64, Ordering::Relaxed);
            (quiet, busy)
        })
    };

    // Quiet baseline first, in the same run.
    std::thread::sleep(Duration::from_millis(500));
    reloading.store(true, Ordering::Relaxed);
    let mut reload_times = Vec::new();
    for n in 0..RELOADS {
        let tmp = dir.path().join(format!("geo.{n}.tmp"));
        std::fs::write(&tmp, embedded_database_bytes()).expect("write tmp");
        std::fs::rename(&tmp, &path).expect("rename");
        let t = Instant::now();
        let report = db.reload_if_changed().expect("reload");
        reload_times.push(t.elapsed());
        assert!(report.changed());
    }
    reloading.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let (mut quiet, mut busy) = reader_thread.join().expect("reader thread");
    quiet.sort();
    busy.sort();
    reload_times.sort();
    println!(
        "reload_under_load: reloads={} lookups={} wrong_or_failed={} reload_ms_median={:.1} reload_ms_max={:.1}",
        RELOADS,
        lookups.load(Ordering::Relaxed),
        wrong.load(Ordering::Relaxed),
        percentile(&reload_times, 0.5).as_secs_f64() * 1e3,
        percentile(&reload_times, 1.0).as_secs_f64() * 1e3,
    );
    for (name, v) in [("quiet", &quiet), ("during_reloads", &busy)] {
        println!(
            "reload_under_load: lookup_ns {name}: samples={} p50={} p99={} p999={} max={}",
            v.len(),
            percentile(v, 0.5).as_nanos(),
            percentile(v, 0.99).as_nanos(),
            percentile(v, 0.999).as_nanos(),
            percentile(v, 1.0).as_nanos(),
        );
    }
    println!("reload_under_load: {:?}", db.info());
}

criterion_group!(benches, bench_lookup, bench_decision);

fn main() {
    benches();
    // These take a few seconds; GEO_BENCH_SKIP_RELOAD=1 skips them.
    if std::env::var_os("GEO_BENCH_SKIP_RELOAD").is_none() {
        interleaved_lookup_ratio();
        reload_under_load();
    }
    Criterion::default().configure_from_args().final_summary();
}
