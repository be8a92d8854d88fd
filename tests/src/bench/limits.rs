//! `bench fleet-limits`: how closely a key's limits hold across three gateways sharing one
//! store (issue 13, item 4). Three gateways run in this process (`Gateway::with_parts`, one
//! `Arc<dyn Store>`), each hammered by its own tasks through its `Auth`, the entry every front
//! end admits through; no sockets, so the figure is the limiter's, not the HTTP stack's.
//!
//! Reported per limit: requests admitted in one window against the limit (allowed/limit), store
//! round trips per admission attempt, and the admission latency; for a concurrency cap, the
//! most streams held at once fleet-wide against the cap. Each cap is contended: at least twice
//! as many tasks as the cap try to hold a stream (fewer could never show the cap holding), and
//! the report says how many acquisitions were refused and how many were admitted only because
//! the store failed (fail-open, when the fleet may exceed the cap).

use anyhow::Context;
use nearpath_config::GatewayConfig;
use nearpath_gateway::fleet_limits::book::CapPool;
use nearpath_gateway::metrics::labels;
use nearpath_gateway::store::{ApiKey, SqliteStore, Store};
use nearpath_gateway::Gateway;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, clap::Args)]
pub struct LimitsArgs {
    /// Requests per minute of the keys measured (one key per figure); `--rpm` alone measures
    /// none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "10,100,1000,10000")]
    pub rpm: Vec<u32>,
    /// Concurrency caps measured.
    #[arg(long, value_delimiter = ',', default_value = "4,40")]
    pub caps: Vec<u32>,
    /// Tasks hammering each gateway. A concurrency cap gets more where this is too few for
    /// twice the cap across the gateways (see [`cap_tasks`]).
    #[arg(long, default_value_t = 8)]
    pub tasks: usize,
    /// `federation.limit_slice_percent`.
    #[arg(long, default_value_t = 10)]
    pub slice_percent: u32,
    /// How long each concurrency run lasts, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub cap_seconds: f64,
    /// A PostgreSQL URL to share instead of a temporary SQLite file.
    #[arg(long)]
    pub store_url: Option<String>,
    /// Start a throwaway PostgreSQL (the tests' `PgServer`) and share that.
    #[arg(long)]
    pub postgres: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How many tasks each of `gateways` gateways runs against a concurrency cap of `cap`: `tasks`,
/// or more, so that at least twice the cap try to hold a stream at once fleet-wide. With fewer
/// tasks than the cap, "held at most N" would prove nothing about the cap.
pub fn cap_tasks(tasks: usize, cap: u32, gateways: usize) -> usize {
    let want = 2 * cap as usize;
    tasks.max(want.div_ceil(gateways.max(1)))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn run(a: LimitsArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = if a.postgres {
        Some(nearpath_tests::pg::PgServer::try_start()?)
    } else {
        None
    };
    let url = match &server {
        Some(s) => Some(s.new_database("fleet_limits_bench")),
        None => a.store_url.clone(),
    };
    let store: Arc<dyn Store> = match &url {
        Some(url) => Arc::new(nearpath_gateway::store::PgStore::open(
            url,
            16,
            Duration::from_secs(5),
        )?),
        None => Arc::new(SqliteStore::open(dir.path().join("fleet.db"))?),
    };
    let mut gateways = Vec::new();
    for i in 0..3 {
        let mut c = GatewayConfig::default();
        // Probe sessions would take node slots mid-measurement (`bench checker` measures them).
        c.checker.enabled = false;
        c.store.path = dir.path().join("fleet.db");
        c.federation.gateway_id = Some(format!("bench-{i}"));
        c.federation.limit_slice_percent = a.slice_percent;
        c.federation.heartbeat_ms = 200;
        c.federation.lease_ms = 600;
        let cert = nearpath_gateway::tls::self_signed(&["localhost"])?;
        gateways.push(Gateway::with_parts(c, cert, store.clone())?);
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut ticks = Vec::new();
    for g in &gateways {
        if let Some(f) = g.shared().auth.fleet.clone() {
            ticks.push(tokio::spawn(f.run(shutdown.clone())));
        }
    }
    let auths: Vec<_> = gateways.iter().map(|g| g.shared().auth.clone()).collect();
    let trips = |auths: &[Arc<nearpath_gateway::auth::Auth>]| -> u64 {
        auths
            .iter()
            .filter_map(|a| a.fleet.as_ref().map(|f| f.round_trips()))
            .sum()
    };
    println!(
        "fleet-limits: 3 gateways, {} tasks each, slices of {} %",
        a.tasks, a.slice_percent
    );
    println!(
        "{:>8} {:>9} {:>9} {:>8} {:>12} {:>12} {:>12}",
        "rpm", "admitted", "ratio", "tries", "trips/try", "p50 µs", "p99 µs"
    );
    let mut rows = Vec::new();
    for (n, &rpm) in a.rpm.iter().enumerate() {
        // Start right after a minute boundary, so that one window holds the whole run.
        let wait = 60_000 - now_ms() % 60_000;
        if wait < 60_000 - 2_000 && a.rpm.len() > 1 {
            tokio::time::sleep(Duration::from_millis(wait + 50)).await;
        }
        let window = now_ms() / 60_000;
        let (key, _) = store
            .create_api_key(&format!("bench-rpm-{n}"), rpm, 1_000_000_000)
            .context("create key")?;
        let before = trips(&auths);
        let admitted = Arc::new(AtomicU64::new(0));
        let tries = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for auth in &auths {
            for _ in 0..a.tasks {
                let (auth, key, admitted, tries) =
                    (auth.clone(), key.clone(), admitted.clone(), tries.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut refusals = 0;
                    // Until this task has been refused 50 times in a row or the window ends.
                    while refusals < 50 && now_ms() / 60_000 == window {
                        let t = Instant::now();
                        let r = auth.admit_request(&key).await;
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                        tries.fetch_add(1, Ordering::Relaxed);
                        match r {
                            Ok(()) => {
                                admitted.fetch_add(1, Ordering::Relaxed);
                                refusals = 0;
                            }
                            Err(_) => refusals += 1,
                        }
                        tokio::task::yield_now().await;
                    }
                    lat
                }));
            }
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await?);
        }
        lat.sort_by(|x, y| x.total_cmp(y));
        let (admitted, tries) = (
            admitted.load(Ordering::Relaxed),
            tries.load(Ordering::Relaxed),
        );
        let trips = trips(&auths) - before;
        let same_window = now_ms() / 60_000 == window;
        let ratio = admitted as f64 / f64::from(rpm);
        println!(
            "{rpm:>8} {admitted:>9} {ratio:>9.3} {tries:>8} {:>12.4} {:>12.0} {:>12.0}{}",
            trips as f64 / tries.max(1) as f64,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            if same_window {
                ""
            } else {
                "  (ran past the window end)"
            }
        );
        rows.push(
            json!({"rpm": rpm, "admitted": admitted, "ratio": ratio, "tries": tries,
            "store_round_trips": trips, "trips_per_try": trips as f64 / tries.max(1) as f64,
            "p50_us": pct(&lat, 0.5), "p99_us": pct(&lat, 0.99), "one_window": same_window}),
        );
    }
    println!();
    println!(
        "{:>8} {:>8} {:>10} {:>9} {:>10} {:>10} {:>10}",
        "cap", "tasks", "max held", "ratio", "admitted", "refused", "fail-open"
    );
    let fail_opens = |auths: &[Arc<nearpath_gateway::auth::Auth>]| -> u64 {
        auths
            .iter()
            .map(|a| {
                a.metrics
                    .limit_fail_open
                    .get_or_create(&labels([("pool", CapPool::Streams.as_str())]))
                    .get()
            })
            .sum()
    };
    let mut caps = Vec::new();
    for (n, &cap) in a.caps.iter().enumerate() {
        let per_gateway = cap_tasks(a.tasks, cap, auths.len());
        let fail_open_before = fail_opens(&auths);
        let (mut key, _) =
            store.create_api_key(&format!("bench-cap-{n}"), 1_000_000, 1_000_000_000)?;
        key.caps.max_concurrent_streams = Some(cap);
        let key: ApiKey = key;
        let held = Arc::new(AtomicU64::new(0));
        let max = Arc::new(AtomicU64::new(0));
        let admitted = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs_f64(a.cap_seconds);
        let mut tasks = Vec::new();
        for auth in &auths {
            for t in 0..per_gateway {
                let (auth, key, held, max, admitted, refused) = (
                    auth.clone(),
                    key.clone(),
                    held.clone(),
                    max.clone(),
                    admitted.clone(),
                    refused.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut i = t as u64;
                    while Instant::now() < end {
                        i += 1;
                        match auth.acquire_stream(&key, "http").await {
                            Ok(guard) => {
                                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                                max.fetch_max(now, Ordering::SeqCst);
                                admitted.fetch_add(1, Ordering::Relaxed);
                                // Streams of 5 to 45 ms.
                                tokio::time::sleep(Duration::from_millis(5 + i * 7 % 41)).await;
                                held.fetch_sub(1, Ordering::SeqCst);
                                drop(guard);
                            }
                            Err(_) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(5)).await
                            }
                        }
                    }
                }));
            }
        }
        for t in tasks {
            t.await?;
        }
        let max = max.load(Ordering::SeqCst);
        let ratio = max as f64 / f64::from(cap);
        let admitted = admitted.load(Ordering::Relaxed);
        let refused = refused.load(Ordering::Relaxed);
        let fail_open = fail_opens(&auths) - fail_open_before;
        let tasks = per_gateway * auths.len();
        println!(
            "{cap:>8} {tasks:>8} {max:>10} {ratio:>9.3} {admitted:>10} {refused:>10} {fail_open:>10}"
        );
        caps.push(
            json!({"cap": cap, "tasks": tasks, "max_held": max, "ratio": ratio,
                         "admitted": admitted, "refused": refused, "fail_open": fail_open}),
        );
    }
    // The gateways give their reservations back before the store (and its server) goes.
    shutdown.cancel();
    for t in ticks {
        let _ = t.await;
    }
    println!(
        "{}",
        json!({"bench": "fleet-limits", "gateways": 3, "tasks_per_gateway": a.tasks,
               "slice_percent": a.slice_percent, "rpm": rows, "caps": caps,
               "store": if url.is_some() { "postgres" } else { "sqlite" }})
    );
    Ok(())
}
