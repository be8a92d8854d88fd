//! `bench nodes-federation`: many nodes registering at once across three gateways that share
//! one PostgreSQL database (a throwaway server from [`nearpath_tests::pg::PgServer`]): the time until all
//! are registered, and the load on the store (transactions and rows per second, from
//! `pg_stat_database`) during the burst.

use anyhow::Context;
use nearpath_gateway::store::{KycStatus, PgStore, Store};
use nearpath_gateway::{Gateway, Listeners};
use nearpath_protocol::tls::ServerVerify;
use nearpath_tests::fake_node::{FakeNode, Registration};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct FederationArgs {
    /// Nodes registering at once, spread round-robin over the gateways.
    #[arg(long, default_value_t = 1000)]
    pub nodes: u32,
    /// Gateways sharing the store.
    #[arg(long, default_value_t = 3)]
    pub gateways: u32,
    /// Connections in each gateway's PostgreSQL pool.
    #[arg(long, default_value_t = 8)]
    pub pool_size: u32,
}

/// `xact_commit`, `xact_rollback`, `tup_inserted + tup_updated + tup_deleted` and
/// `tup_returned` of the database.
fn pg_counters(url: &str, db: &str) -> anyhow::Result<[i64; 4]> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    // The statistics collector is flushed lazily; this makes the reading current.
    let _ = c.execute("SELECT pg_stat_clear_snapshot()", &[]);
    let row = c.query_one(
        "SELECT xact_commit, xact_rollback, tup_inserted + tup_updated + tup_deleted, \
         tup_returned FROM pg_stat_database WHERE datname = $1",
        &[&db],
    )?;
    Ok([row.get(0), row.get(1), row.get(2), row.get(3)])
}

pub async fn run(a: FederationArgs) -> anyhow::Result<()> {
    // The synchronous PostgreSQL client must not block a runtime thread that drives tasks.
    fn sync<R>(f: impl FnOnce() -> R) -> R {
        tokio::task::block_in_place(f)
    }
    let pg = sync(nearpath_tests::pg::PgServer::try_start).map_err(|e| anyhow::anyhow!("{e}"))?;
    let url = sync(|| pg.new_database("bench_federation"));
    let db = url.rsplit('/').next().unwrap_or_default().to_string();
    let token = sync(|| -> anyhow::Result<String> {
        let seed = PgStore::open(&url, 2, Duration::from_secs(5)).context("opening the store")?;
        let op = seed.create_operator("op-bench", KycStatus::Verified)?;
        Ok(seed.create_enrolment_token(&op.id)?.1)
    })?;
    let mut gateways = Vec::new();
    let shutdown = CancellationToken::new();
    for g in 0..a.gateways.max(1) {
        let mut cfg = nearpath_config::GatewayConfig::default();
        // Probe sessions would take node slots mid-measurement (`bench checker` measures them).
        cfg.checker.enabled = false;
        cfg.admin.token = Some("bench-admin-token-0123456789".into());
        cfg.store.url = Some(url.clone());
        cfg.store.pool_size = a.pool_size;
        cfg.nodes.heartbeat_ms = 1000;
        // One load generator address opens every connection: lift the per-address guards.
        cfg.quic.handshake_rate_per_ip_per_s = 1_000_000;
        cfg.quic.handshake_burst_per_ip = 1_000_000;
        cfg.quic.max_unauthenticated_per_ip = 1_000_000;
        cfg.quic.retry_above_handshakes = 1_000_000;
        let store: Arc<dyn Store> = Arc::new(sync(|| {
            PgStore::open(&url, a.pool_size, Duration::from_secs(5))
        })?);
        let cert = nearpath_gateway::tls::self_signed(&["localhost"])?;
        let sha = cert.sha256;
        let gw = Gateway::with_parts(cfg, cert, store)?;
        let ip = format!("127.0.0.{}", 31 + g);
        let any: SocketAddr = format!("{ip}:0").parse()?;
        let (addrs, _task) = gw.start(Listeners::bind(any, any, any).await?, shutdown.clone())?;
        gateways.push((addrs.quic, sha));
    }
    let before = sync(|| pg_counters(&url, &db))?;
    let t0 = Instant::now();
    let registered = Arc::new(AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.nodes {
        let (quic, sha) = gateways[i as usize % gateways.len()];
        let token = token.clone();
        let registered = registered.clone();
        tasks.spawn(async move {
            let endpoint = nearpath_tests::fake_node::node_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                ServerVerify::PinnedSha256(sha),
                1 << 20,
            )
            .map_err(|e| e.to_string())?;
            let conn = endpoint
                .connect(quic, "localhost")
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let reg = Registration::new(&format!("fed-{i}"), &token).models(&["m"], 4);
            let node =
                FakeNode::try_register_on(endpoint, conn, reg.message(), Duration::from_secs(60))
                    .await
                    .map_err(|e| e.to_string())?;
            node.registered().map_err(|e| e.to_string())?;
            registered.fetch_add(1, Ordering::Relaxed);
            // Held (not heartbeating) until the reading is taken.
            Ok::<_, String>(node)
        });
    }
    let mut nodes = Vec::new();
    let mut errors = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(n)) => nodes.push(n),
            Ok(Err(e)) if errors.len() < 5 => errors.push(e),
            _ => {}
        }
    }
    let took = t0.elapsed();
    let after = sync(|| pg_counters(&url, &db))?;
    let secs = took.as_secs_f64().max(1e-9);
    let d = |i: usize| (after[i] - before[i]) as f64;
    println!(
        "nodes-federation: {} of {} nodes registered across {} gateways on PostgreSQL in {:.0} ms \
         ({:.0} registrations/s); store: {:.0} commits ({:.0}/s, {:.1} per node), {:.0} rollbacks, \
         {:.0} rows written ({:.0}/s), {:.0} rows read",
        registered.load(Ordering::Relaxed),
        a.nodes,
        gateways.len(),
        took.as_secs_f64() * 1000.0,
        f64::from(registered.load(Ordering::Relaxed)) / secs,
        d(0),
        d(0) / secs,
        d(0) / f64::from(a.nodes.max(1)),
        d(1),
        d(2),
        d(2) / secs,
        d(3),
    );
    if !errors.is_empty() {
        println!("first errors: {errors:?}");
    }
    // The machine-readable summary, last (as every bench prints one).
    println!(
        "{}",
        serde_json::json!({
            "bench": "nodes-federation",
            "nodes": a.nodes,
            "gateways": gateways.len(),
            "registered": registered.load(Ordering::Relaxed),
            "all_registered_ms": took.as_secs_f64() * 1000.0,
            "store_commits": d(0),
            "store_commits_per_s": d(0) / secs,
            "store_rollbacks": d(1),
            "store_rows_written": d(2),
            "store_rows_read": d(3),
        })
    );
    drop(nodes);
    shutdown.cancel();
    Ok(())
}
