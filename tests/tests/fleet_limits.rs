//! Limits that hold fleet-wide (issue 13, item 4): gateways sharing a store lease each key's
//! per-minute budgets in slices and publish their concurrency holds with an expiry, so a key's
//! requests/min and concurrency caps hold across the federation, not per gateway. Also the
//! store methods behind them, against hostile arguments.

mod common;

use common::*;
use nearpath_config::GatewayConfig;
use nearpath_gateway::auth::CapGuard;
use nearpath_gateway::store::{FleetHold, PgStore, SqliteStore, Store, StoreError};
use nearpath_tests::pg::PgServer;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `n` gateways (`gw-0`, `gw-1`, ...) in a federation on one shared SQLite store.
async fn federation(
    n: usize,
    edit: impl Fn(&mut GatewayConfig),
) -> (Vec<TestGateway>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("federation.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    (federation_on(store, path, n, edit).await, dir)
}

/// `n` gateways in a federation on `store`.
async fn federation_on(
    store: Arc<dyn Store>,
    path: std::path::PathBuf,
    n: usize,
    edit: impl Fn(&mut GatewayConfig),
) -> Vec<TestGateway> {
    let mut gws = Vec::new();
    for i in 0..n {
        gws.push(
            TestGateway::start_sharing(store.clone(), path.clone(), |c| {
                c.federation.gateway_id = Some(format!("gw-{i}"));
                c.federation.heartbeat_ms = 200;
                c.federation.lease_ms = 600;
                edit(c);
            })
            .await,
        );
    }
    gws
}

/// The sum of every sample of a metric family (all label sets) on a gateway's `/metrics`.
async fn metric_sum(gw: &TestGateway, family: &str) -> f64 {
    let (status, page) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    assert_eq!(status, 200);
    page.lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn round_trips(gw: &TestGateway) -> u64 {
    gw.shared
        .auth
        .fleet
        .as_ref()
        .expect("federated")
        .round_trips()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_requests_per_minute_hold_across_three_gateways() {
    let (gws, _dir) = federation(3, |_| {}).await;
    hammer_ten_per_minute(&gws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_requests_per_minute_hold_across_three_gateways_on_postgresql() {
    let Some(server) = PgServer::shared() else {
        return;
    };
    let url = server.new_database("fleet_rpm");
    let store: Arc<dyn Store> = Arc::new(
        tokio::task::spawn_blocking(move || PgStore::open(&url, 8, Duration::from_secs(20)))
            .await
            .unwrap()
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let gws = federation_on(store, dir.path().join("unused.db"), 3, |_| {}).await;
    hammer_ten_per_minute(&gws).await;
}

/// Hammers three gateways at once with a fresh key of 10 requests/min and checks that the
/// federation admits 10 (±1) in the window, not 30.
async fn hammer_ten_per_minute(gws: &[TestGateway]) {
    let body = r#"{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}"#;
    // A run that crosses a minute boundary counts two windows: it is run again with a fresh key.
    for attempt in 0..3 {
        let secret = format!("npk_fleet_rpm_{attempt}");
        gws[0]
            .store
            .insert_api_key_secret(&secret, "tenant-rpm", 10, 1_000_000)
            .unwrap();
        let window = now_ms() / 60_000;
        let trips_before: u64 = gws.iter().map(round_trips).sum();
        let (mut admitted, mut refused, mut sent) = (0u32, [0u32; 3], 0u32);
        // Hammer all three at once until each has refused a few times.
        while refused.iter().any(|&r| r < 3) && sent < 600 {
            let urls: Vec<String> = gws
                .iter()
                .map(|g| g.api_url("/v1/chat/completions"))
                .collect();
            let (a, b, c) = tokio::join!(
                gws[0].http.post(&urls[0], Some(&secret), body, &[]),
                gws[1].http.post(&urls[1], Some(&secret), body, &[]),
                gws[2].http.post(&urls[2], Some(&secret), body, &[]),
            );
            for (i, (status, text)) in [a, b, c].into_iter().enumerate() {
                sent += 1;
                if status == 429 {
                    assert!(text.contains("rate limit"), "{text}");
                    refused[i] += 1;
                } else {
                    admitted += 1;
                }
            }
        }
        if now_ms() / 60_000 != window {
            continue;
        }
        let trips: u64 = gws.iter().map(round_trips).sum::<u64>() - trips_before;
        eprintln!(
            "fleet rpm: {admitted} admitted of a limit of 10 across 3 gateways ({sent} sent), {trips} store round trips ({:.3} per request)",
            trips as f64 / f64::from(sent)
        );
        assert!((9..=11).contains(&admitted), "{admitted} admitted, not 10");
        for gw in gws {
            assert_eq!(metric_sum(gw, "nearpath_limit_fail_open").await, 0.0);
            assert!(metric_sum(gw, "nearpath_limit_leases").await >= 1.0);
        }
        return;
    }
    panic!("every attempt crossed a minute boundary");
}

/// Tries one stream of `key` at each gateway in turn until the fleet holds `want` of them or
/// `timeout` passes.
async fn top_up(
    gws: &[TestGateway],
    key: &nearpath_gateway::store::ApiKey,
    held: &mut Vec<CapGuard>,
    want: usize,
    timeout: Duration,
) {
    let start = Instant::now();
    let mut i = 0;
    while held.len() < want {
        assert!(
            start.elapsed() < timeout,
            "the fleet holds only {}",
            held.len()
        );
        if let Ok(g) = gws[i % gws.len()]
            .shared
            .auth
            .acquire_stream(key, "http")
            .await
        {
            held.push(g);
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_cap_of_4_holds_across_three_gateways() {
    let (gws, _dir) = federation(3, |c| c.inference.default_max_concurrent_streams = 4).await;
    let key = gws[0].store.authenticate_api_key(API_KEY).unwrap().unwrap();
    // A burst: twelve streams at once, four at each gateway.
    let tries: Vec<_> = (0..12)
        .map(|i| {
            let auth = gws[i % 3].shared.auth.clone();
            let key = key.clone();
            tokio::spawn(async move { auth.acquire_stream(&key, "http").await.ok() })
        })
        .collect();
    let mut held = Vec::new();
    for t in tries {
        if let Some(g) = t.await.unwrap() {
            held.push(g);
        }
    }
    assert!(
        (1..=4).contains(&held.len()),
        "{} held after the burst",
        held.len()
    );
    // Topped up one at a time, the fleet reaches 4 and no gateway admits a fifth.
    top_up(&gws, &key, &mut held, 4, Duration::from_secs(10)).await;
    for gw in &gws {
        let r = gw
            .shared
            .auth
            .acquire_stream(&key, "http")
            .await
            .err()
            .expect("a fifth");
        assert_eq!(r.code, "concurrency_limit_exceeded");
    }
    // Freed slots move to another gateway once their holder's tick gives them back.
    held.clear();
    let only_two = &gws[2..];
    top_up(only_two, &key, &mut held, 4, Duration::from_secs(10)).await;
    assert!(only_two[0]
        .shared
        .auth
        .acquire_stream(&key, "http")
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateways_held_concurrency_expires_after_its_lease() {
    let (gws, _dir) = federation(1, |c| c.inference.default_max_concurrent_streams = 4).await;
    let key = gws[0].store.authenticate_api_key(API_KEY).unwrap().unwrap();
    // What a gateway that died holding four streams of the key leaves in the store.
    let expires = now_ms() + 1_500;
    gws[0]
        .store
        .publish_holds(
            "gw-dead",
            &[FleetHold {
                gateway_id: "gw-dead".into(),
                key_id: key.id.clone(),
                pool: "streams".into(),
                held: 4,
                expires_at_ms: expires,
            }],
        )
        .unwrap();
    let r = gws[0]
        .shared
        .auth
        .acquire_stream(&key, "http")
        .await
        .err()
        .expect("refused");
    assert!(r.message.contains("across the federation"), "{}", r.message);
    let g = eventually(
        "the dead gateway's holds to expire",
        Duration::from_secs(10),
        || async { gws[0].shared.auth.acquire_stream(&key, "http").await.ok() },
    )
    .await;
    assert!(
        now_ms() >= expires,
        "admitted before the dead gateway's lease ended"
    );
    drop(g);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_keeps_its_in_memory_limits() {
    let gw = TestGateway::start(|_| {}).await;
    assert!(gw.shared.auth.fleet.is_none());
    gw.store
        .insert_api_key_secret("npk_alone", "t", 3, 1_000_000)
        .unwrap();
    let body = r#"{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}"#;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (s, _) = gw
            .http
            .post(
                &gw.api_url("/v1/chat/completions"),
                Some("npk_alone"),
                body,
                &[],
            )
            .await;
        statuses.push(s);
    }
    assert!(statuses[..3].iter().all(|&s| s != 429), "{statuses:?}");
    assert_eq!(statuses[3], 429);
    assert_eq!(gw.store.fleet_holds(None, 0).unwrap(), vec![]);
}

// ---- The store methods (SQLite here; the same contract runs on PostgreSQL where it is set up).

fn invalid(r: Result<impl std::fmt::Debug, StoreError>, field: &str) {
    match r {
        Err(StoreError::Invalid { field: f, .. }) if f == field => {}
        other => panic!("expected invalid {field}, got {other:?}"),
    }
}

/// A window start (1,800,000,000,000 ms is a whole minute).
const W: u64 = 1_800_000_000_000;

/// The limit methods' contract, for any store.
pub fn limits_contract(store: Arc<dyn Store>) {
    // A lease never grants beyond the limit; windows and pools count apart.
    assert_eq!(store.lease_units("k1", "requests", W, 4, 10).unwrap(), 4);
    assert_eq!(store.lease_units("k1", "requests", W, 4, 10).unwrap(), 4);
    assert_eq!(store.lease_units("k1", "requests", W, 4, 10).unwrap(), 2);
    assert_eq!(store.lease_units("k1", "requests", W, 4, 10).unwrap(), 0);
    assert_eq!(
        store
            .lease_units("k1", "requests", W + 60_000, 4, 10)
            .unwrap(),
        4
    );
    assert_eq!(store.lease_units("k1", "tokens", W, 4, 10).unwrap(), 4);
    assert_eq!(store.lease_units("k2", "requests", W, 40, 10).unwrap(), 10);
    assert_eq!(store.lease_units("k3", "requests", W, 0, 10).unwrap(), 0);
    // A limit lowered mid-window grants nothing more once used passes it.
    assert_eq!(store.lease_units("k1", "requests", W, 4, 5).unwrap(), 0);
    // Hostile arguments: forged or huge key ids, unknown pools, overflowing counts.
    invalid(
        store.lease_units(&"k".repeat(300), "requests", W, 1, 10),
        "key_id",
    );
    invalid(store.lease_units("", "requests", W, 1, 10), "key_id");
    invalid(
        store.lease_units("k1", "requests'; DROP TABLE x;--", W, 1, 10),
        "pool",
    );
    invalid(
        store.lease_units("k1", "streams", W + 1, 1, 10),
        "window_start_ms",
    );
    invalid(
        store.lease_units("k1", "requests", u64::MAX - u64::MAX % 60_000, 1, 10),
        "window_start_ms",
    );
    invalid(store.lease_units("k1", "requests", W, u64::MAX, 10), "want");
    invalid(store.lease_units("k1", "requests", W, 1, u64::MAX), "limit");
    invalid(
        store.lease_units("k1", "requests", W, 1, i64::MAX as u64),
        "limit",
    );
    // The largest counts accepted cannot overflow the counter.
    let big = (i64::MAX as u64) / 2;
    assert_eq!(store.lease_units("k4", "tokens", W, big, big).unwrap(), big);
    assert_eq!(store.lease_units("k4", "tokens", W, big, big).unwrap(), 0);

    // Holds: published per gateway, live until they expire, 0 removes.
    let hold = |gw: &str, key: &str, pool: &str, held: u64, exp: u64| FleetHold {
        gateway_id: gw.into(),
        key_id: key.into(),
        pool: pool.into(),
        held,
        expires_at_ms: exp,
    };
    store
        .publish_holds(
            "a",
            &[
                hold("a", "k1", "streams", 3, 2_000),
                hold("a", "k1", "sessions", 1, 2_000),
            ],
        )
        .unwrap();
    store
        .publish_holds("b", &[hold("b", "k1", "streams", 2, 1_000)])
        .unwrap();
    store
        .publish_holds("b", &[hold("b", "k2", "streams", 1, 5_000)])
        .unwrap();
    let live = store.fleet_holds(Some("k1"), 999).unwrap();
    assert_eq!(
        live.iter()
            .map(|h| (h.gateway_id.as_str(), h.pool.as_str(), h.held))
            .collect::<Vec<_>>(),
        vec![
            ("a", "sessions", 1),
            ("a", "streams", 3),
            ("b", "streams", 2)
        ]
    );
    // b's hold of k1 has expired at 1000.
    assert_eq!(store.fleet_holds(Some("k1"), 1_000).unwrap().len(), 2);
    assert_eq!(store.fleet_holds(None, 1_000).unwrap().len(), 3);
    // Renewal replaces; 0 removes.
    store
        .publish_holds(
            "a",
            &[
                hold("a", "k1", "streams", 1, 3_000),
                hold("a", "k1", "sessions", 0, 3_000),
            ],
        )
        .unwrap();
    let live = store.fleet_holds(Some("k1"), 2_500).unwrap();
    assert_eq!(live, vec![hold("a", "k1", "streams", 1, 3_000)]);
    // Hostile: a gateway publishing another's holds, rate pools, huge counts, floods.
    invalid(
        store.publish_holds("a", &[hold("b", "k1", "streams", 9, 3_000)]),
        "holds.gateway_id",
    );
    invalid(
        store.publish_holds("a", &[hold("a", "k1", "requests", 1, 3_000)]),
        "pool",
    );
    invalid(
        store.publish_holds("a", &[hold("a", "k1", "bogus", 1, 3_000)]),
        "pool",
    );
    invalid(
        store.publish_holds("a", &[hold("a", "k1", "streams", u64::MAX, 3_000)]),
        "held",
    );
    invalid(
        store.publish_holds("a", &[hold("a", "k1", "streams", 1, u64::MAX)]),
        "expires_at_ms",
    );
    invalid(
        store.publish_holds("a", &[hold("a", &"k".repeat(300), "streams", 1, 3_000)]),
        "key_id",
    );
    invalid(store.publish_holds(&"g".repeat(300), &[]), "gateway_id");
    let flood: Vec<_> = (0..10_001)
        .map(|i| hold("a", &format!("k{i}"), "streams", 1, 3_000))
        .collect();
    invalid(store.publish_holds("a", &flood), "holds");
    invalid(store.fleet_holds(Some(&"k".repeat(300)), 0), "key_id");
    // A refused publish changed nothing.
    assert_eq!(
        store.fleet_holds(Some("k1"), 2_500).unwrap(),
        vec![hold("a", "k1", "streams", 1, 3_000)]
    );

    // Pruning drops old windows and expired holds.
    let pruned = store.prune_limits(W + 60_000, 4_000).unwrap();
    assert!(pruned >= 5, "{pruned}");
    assert_eq!(
        store
            .lease_units("k1", "requests", W + 60_000, 10, 10)
            .unwrap(),
        6
    );
    assert!(store
        .fleet_holds(None, 0)
        .unwrap()
        .iter()
        .all(|h| h.expires_at_ms > 4_000));
}

/// Gateways leasing one key's window at once from several threads are granted the limit
/// exactly, together.
pub fn concurrent_leases_never_pass_the_limit(stores: Vec<Arc<dyn Store>>) {
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            std::thread::spawn(move || {
                let mut got = 0;
                loop {
                    match store.lease_units("hot", "requests", W, 3, 1_000) {
                        Ok(0) => return got,
                        Ok(n) => got += n,
                        Err(e) if e.is_retryable() => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 1_000);
}

#[test]
fn the_limit_store_methods_refuse_hostile_arguments_and_never_grant_beyond_the_limit_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.db");
    limits_contract(Arc::new(SqliteStore::open(&path).unwrap()));
    // Two connections to one file, as two gateway processes would have.
    let path2 = dir.path().join("race.db");
    let a: Arc<dyn Store> = Arc::new(SqliteStore::open(&path2).unwrap());
    let b: Arc<dyn Store> = Arc::new(SqliteStore::open(&path2).unwrap());
    concurrent_leases_never_pass_the_limit(vec![a, b]);
}

#[test]
fn the_limit_store_methods_refuse_hostile_arguments_and_never_grant_beyond_the_limit_on_postgresql()
{
    let Some(server) = PgServer::shared() else {
        return;
    };
    let open = |url: &str| -> Arc<dyn Store> {
        Arc::new(PgStore::open(url, 4, Duration::from_secs(20)).unwrap())
    };
    limits_contract(open(&server.new_database("limits_contract")));
    // Two pools on one database, as two gateways would have.
    let url = server.new_database("limits_race");
    concurrent_leases_never_pass_the_limit(vec![open(&url), open(&url)]);
}
