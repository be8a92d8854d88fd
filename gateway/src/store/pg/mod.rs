//! The PostgreSQL store: the same [`Store`] as [`super::SqliteStore`], for several regional
//! gateways sharing one database (issue 13, "Regional gateways").
//!
//! Built on the synchronous `postgres` driver (sfackler's, over tokio-postgres) with an `r2d2`
//! connection pool: the [`Store`] trait is synchronous and the gateway already calls it from
//! `spawn_blocking`, so a blocking driver fits without a second async runtime in the call path.
//! The driver runs a small runtime of its own per connection, which may not be entered from a
//! thread that is driving async tasks; every method therefore runs its driver work through
//! `blocking` (`block_in_place` on a multi-threaded runtime's worker, a scoped thread on a
//! current-thread runtime), so the store is safe to call anywhere, though async code should
//! still call it from `spawn_blocking` (as the trait asks) to keep workers free. Code that uses
//! [`PgStore::conn`] directly must do the same (call it through `spawn_blocking`).
//!
//! # Semantics
//! Every method behaves as [`super::SqliteStore`]'s does (same validation, error kinds,
//! ordering and secrets as SHA-256 digests); the shared suite in `gateway/tests/store.rs` runs
//! against both. Differences: PostgreSQL `TEXT` cannot hold NUL, so identifiers and names with
//! NUL are refused as [`StoreError::Invalid`], except in usage records, whose text fields keep
//! the record with NUL replaced by U+FFFD (a hostile model name must not make billing fail).
//! Usage records are committed one statement each (`synchronous_commit` decides durability;
//! PostgreSQL's own group commit shares the flushes), and acknowledged only after the commit.
//!
//! # Retries
//! Transient failures ([`is_transient`]) are retried inside the store, at most
//! [`MAX_ATTEMPTS`] times in all, with a short backoff: any transient failure for operations
//! that are idempotent (reads, revocations, claims, updates to absolute values, the fixed-secret
//! key insert), and for the others (counters, appends, creations with fresh ids) only failures
//! that PostgreSQL reports as rolled back (serialization failure, deadlock), never a connection
//! lost while the outcome of a commit is unknown.
//!
//! # Portability
//! The SQL is kept portable to CockroachDB: no advisory locks, no PostgreSQL-only extensions, no
//! `LISTEN/NOTIFY` on hot paths. What it relies on: `INSERT ... ON CONFLICT ... DO UPDATE` /
//! `DO NOTHING`, `RETURNING`, `SELECT ... FOR UPDATE`, `GREATEST`, `COALESCE`, `BIGSERIAL`
//! (insertion order of operators, tokens and keys, and ids of penalties and usage records: on
//! CockroachDB these come from `unique_rowid()`, which orders by time but not strictly across
//! nodes), `BIGINT`/`DOUBLE PRECISION`/`TEXT`/`BOOLEAN` columns, sums cast back to `BIGINT`
//! (both return `NUMERIC`/`DECIMAL` for sums of integers), no integer division (days are
//! computed in Rust), and transactions at the default isolation level (serialization failures
//! are retryable errors; CockroachDB runs everything serializable). The migration runs DDL inside
//! a transaction, which CockroachDB accepts for `CREATE TABLE`/`CREATE INDEX` of new objects.
//!
//! # Migrations
//! `MIGRATIONS[i]` takes the schema from version i to i + 1 (table `nearpath_schema`, one row).
//! Append, never edit. Gateways starting together race to migrate: the version row is locked
//! with `SELECT ... FOR UPDATE` inside the migrating transaction, so exactly one applies each
//! step and the others then see the new version; the version table itself is created with
//! `CREATE TABLE IF NOT EXISTS`, whose own race (a unique violation in the catalog) is retried.
//! A database whose version is newer than this build's is refused ([`StoreError::SchemaTooNew`]).

mod checker;
mod directory;
pub mod tls;

use super::sqlite::{check_secret, UsageRow};
use super::*;
use ::postgres::types::ToSql;
use ::postgres::{GenericClient, Row};
use tls::PgTls;

mod limits;
mod redirect;
use r2d2_postgres::PostgresConnectionManager;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// A pooled connection.
pub type PgConn = r2d2::PooledConnection<PostgresConnectionManager<PgTls>>;

type Pool = r2d2::Pool<PostgresConnectionManager<PgTls>>;

/// Schema migrations, oldest first. Append, never edit.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the base schema, equivalent to SQLite's version 4 (operators, tokens, keys with caps
    // and policy, node ids, SLA records per (operator, node), penalties, GPU models, usage and
    // the ledger probe). `seq` columns keep insertion order ("oldest first" listings), which
    // SQLite gets from its rowid.
    r#"
CREATE TABLE IF NOT EXISTS operators (
    id             TEXT PRIMARY KEY,
    seq            BIGSERIAL NOT NULL,
    name           TEXT NOT NULL,
    kyc_status     TEXT NOT NULL CHECK (kyc_status IN ('pending', 'verified', 'suspended')),
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS enrolment_tokens (
    id             TEXT PRIMARY KEY,
    seq            BIGSERIAL NOT NULL,
    operator_id    TEXT NOT NULL REFERENCES operators (id),
    secret_hash    TEXT NOT NULL UNIQUE,
    prefix         TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    revoked_at_ms  BIGINT
);
CREATE INDEX IF NOT EXISTS enrolment_tokens_by_operator ON enrolment_tokens (operator_id);

CREATE TABLE IF NOT EXISTS api_keys (
    id                         TEXT PRIMARY KEY,
    seq                        BIGSERIAL NOT NULL,
    tenant                     TEXT NOT NULL,
    secret_hash                TEXT NOT NULL UNIQUE,
    prefix                     TEXT NOT NULL,
    requests_per_minute        BIGINT NOT NULL,
    tokens_per_minute          BIGINT NOT NULL,
    created_at_ms              BIGINT NOT NULL,
    revoked_at_ms              BIGINT,
    max_concurrent_streams     BIGINT,
    max_concurrent_sessions    BIGINT,
    session_starts_per_minute  BIGINT,
    allowed_models             TEXT,
    expires_at_ms              BIGINT,
    budget_tokens_per_day      BIGINT,
    budget_tokens_per_month    BIGINT,
    budget_usd_per_day         DOUBLE PRECISION,
    budget_usd_per_month       DOUBLE PRECISION
);

-- Node ids belong to their first operator forever.
CREATE TABLE IF NOT EXISTS node_ids (
    node_id        TEXT PRIMARY KEY,
    operator_id    TEXT NOT NULL,
    claimed_at_ms  BIGINT NOT NULL
);

-- SLA records, penalties and usage are history: they reference operators and nodes by id
-- without foreign keys, so that the ledger never refuses a record because of an admin change.
CREATE TABLE IF NOT EXISTS sla_records (
    node_id                 TEXT NOT NULL,
    operator_id             TEXT NOT NULL,
    first_registered_at_ms  BIGINT NOT NULL,
    last_seen_at_ms         BIGINT NOT NULL,
    registered_ms           BIGINT NOT NULL,
    registrations           BIGINT NOT NULL,
    sessions_served         BIGINT NOT NULL,
    sessions_failed         BIGINT NOT NULL,
    heartbeat_misses        BIGINT NOT NULL,
    penalty_events          BIGINT NOT NULL,
    last_rtt_ms             DOUBLE PRECISION,
    PRIMARY KEY (operator_id, node_id)
);
CREATE INDEX IF NOT EXISTS sla_records_by_node ON sla_records (node_id);

CREATE TABLE IF NOT EXISTS penalty_events (
    id               BIGSERIAL PRIMARY KEY,
    node_id          TEXT NOT NULL,
    operator_id      TEXT NOT NULL,
    at_ms            BIGINT NOT NULL,
    kind             TEXT NOT NULL,
    active_sessions  BIGINT NOT NULL,
    detail           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS penalty_events_by_node ON penalty_events (operator_id, node_id, at_ms);
CREATE INDEX IF NOT EXISTS penalty_events_by_node_id ON penalty_events (node_id);

CREATE TABLE IF NOT EXISTS gpu_models (
    model_key         TEXT PRIMARY KEY,
    example           TEXT NOT NULL,
    class             TEXT,
    first_seen_at_ms  BIGINT NOT NULL,
    last_seen_at_ms   BIGINT NOT NULL,
    seen              BIGINT NOT NULL,
    classified_at_ms  BIGINT
);

CREATE TABLE IF NOT EXISTS usage_records (
    id                      BIGSERIAL PRIMARY KEY,
    at_ms                   BIGINT NOT NULL,
    kind                    TEXT NOT NULL CHECK (kind IN ('inference', 'game')),
    request_id              TEXT NOT NULL,
    tenant                  TEXT NOT NULL,
    api_key_id              TEXT NOT NULL,
    node_id                 TEXT NOT NULL,
    operator_id             TEXT NOT NULL,
    workload                TEXT NOT NULL,
    outcome                 TEXT NOT NULL,
    prompt_tokens           BIGINT NOT NULL,
    completion_tokens       BIGINT NOT NULL,
    ttft_ms                 DOUBLE PRECISION,
    duration_ms             DOUBLE PRECISION NOT NULL,
    gpu_seconds             DOUBLE PRECISION NOT NULL,
    frames                  BIGINT NOT NULL,
    bytes                   BIGINT NOT NULL,
    node_prompt_tokens      BIGINT,
    node_completion_tokens  BIGINT
);
CREATE INDEX IF NOT EXISTS usage_records_by_time ON usage_records (at_ms);
CREATE INDEX IF NOT EXISTS usage_records_by_key ON usage_records (api_key_id, at_ms);

-- The row the ledger health probe rewrites while usage cannot be committed.
CREATE TABLE IF NOT EXISTS ledger_probe (
    id     BIGINT PRIMARY KEY CHECK (id = 1),
    at_ms  BIGINT NOT NULL
);
"#,
    // 2 (issue 13, fleet-wide limits): the per-minute counters gateways lease slices of, and
    // each gateway's concurrency holds with their expiry.
    limits::MIGRATION,
    // 3 (issue 13, redirects, `redirect.rs`): the federation's secret, one row.
    "CREATE TABLE IF NOT EXISTS federation_secret (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        secret         BYTEA NOT NULL,
        created_at_ms  BIGINT NOT NULL
    )",
    // 4 (issue 13, session resume, `redirect.rs`): the sessions directory.
    "CREATE TABLE IF NOT EXISTS game_session_dir (
        session_id           BIGINT PRIMARY KEY,
        key_id               TEXT NOT NULL,
        node_id              TEXT NOT NULL,
        gateway_id           TEXT NOT NULL,
        game                 TEXT NOT NULL,
        width                BIGINT NOT NULL,
        height               BIGINT NOT NULL,
        fps                  BIGINT NOT NULL,
        bitrate_kbps         BIGINT NOT NULL,
        resume_token_sha256  TEXT NOT NULL,
        updated_at_ms        BIGINT NOT NULL
    )",
    // 5 (issue 13): the gateway and node directories (see `directory.rs`).
    directory::MIGRATION,
    // 6 (issue 14): the checker's records: check records and each gateway's latest vote per
    // node, the GPUs each node reports, and each node's verification snapshot (`checker.rs`).
    checker::MIGRATION,
    // 7 (issue 15): the session's video codec in the sessions directory.
    "ALTER TABLE game_session_dir ADD COLUMN codec TEXT NOT NULL DEFAULT 'h264'",
    // 8 (issues 13 and 15): each node's video encoders in the node directory.
    directory::ENCODERS_MIGRATION,
    // 9 (issue 13): each node's model capabilities in the node directory.
    directory::MODEL_CAPS_MIGRATION,
    // 10 (issue 13): each node's ISO 3166-2 subdivision in the node directory.
    directory::SUBDIVISION_MIGRATION,
];

/// The newest schema version this build knows.
pub const PG_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How many times in all an operation is tried when it fails transiently.
pub const MAX_ATTEMPTS: u32 = 3;

/// How often the ledger is probed while it cannot commit (as the SQLite writer does), so that
/// the gateway, which refuses new work meanwhile, notices the recovery.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

const OPERATOR_COLS: &str = "id, name, kyc_status, created_at_ms, updated_at_ms";
const TOKEN_COLS: &str = "id, operator_id, created_at_ms, prefix, revoked_at_ms IS NOT NULL";
const API_KEY_COLS: &str = "id, tenant, requests_per_minute, tokens_per_minute, created_at_ms, \
     revoked_at_ms IS NOT NULL, prefix, max_concurrent_streams, max_concurrent_sessions, \
     session_starts_per_minute, allowed_models, expires_at_ms, budget_tokens_per_day, \
     budget_tokens_per_month, budget_usd_per_day, budget_usd_per_month";
const SLA_COLS: &str = "node_id, operator_id, first_registered_at_ms, last_seen_at_ms, \
     registered_ms, registrations, sessions_served, sessions_failed, heartbeat_misses, \
     penalty_events, last_rtt_ms";
const GPU_MODEL_COLS: &str =
    "model_key, example, class, first_seen_at_ms, last_seen_at_ms, seen, classified_at_ms";
const PENALTY_COLS: &str = "id, node_id, operator_id, at_ms, kind, active_sessions, detail";
const USAGE_COLS: &str = "id, at_ms, kind, request_id, tenant, api_key_id, node_id, operator_id, \
     workload, outcome, prompt_tokens, completion_tokens, ttft_ms, duration_ms, gpu_seconds, \
     frames, bytes, node_prompt_tokens, node_completion_tokens";

/// The usage ledger's health, shared with the probe thread.
#[derive(Debug)]
struct LedgerState {
    healthy: AtomicBool,
    failures: AtomicU64,
}

impl LedgerState {
    fn committed(&self) {
        if !self.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!("usage ledger (PostgreSQL) commits again");
        }
    }

    fn failed(&self, err: &StoreError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::error!(error = %err, "usage ledger (PostgreSQL) cannot commit; new work is refused until it can");
        }
    }
}

/// The PostgreSQL-backed [`Store`].
pub struct PgStore {
    /// `None` only while dropping (see [`Drop`]).
    pool: Option<Pool>,
    ledger: Arc<LedgerState>,
    /// Dropping it stops the probe thread.
    stop_probe: Option<mpsc::Sender<()>>,
    probe_thread: Option<JoinHandle<()>>,
    /// The URL without credentials, for error messages.
    location: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.location)
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

/// True when a PostgreSQL error is transient: the connection was lost, or the server asks the
/// client to retry (serialization failure, deadlock, too many connections, shutting down).
pub fn is_transient(e: &::postgres::Error) -> bool {
    use ::postgres::error::SqlState;
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .contains(code),
        // No SQLSTATE: an I/O or protocol failure on the connection.
        None => true,
    }
}

/// True when PostgreSQL reported that the transaction was rolled back and may simply be run
/// again (so even an operation that is not idempotent may be retried).
fn rolled_back(e: &StoreError) -> bool {
    use ::postgres::error::SqlState;
    match e {
        StoreError::Postgres { source, .. } => source.code().is_some_and(|c| {
            *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        }),
        _ => false,
    }
}

/// Which failures an operation may be retried after (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Running it twice has the effect of running it once: any transient failure.
    Idempotent,
    /// Only failures PostgreSQL reports as rolled back.
    IfRolledBack,
}

/// Runs `f`, which uses the driver, so that the driver's own runtime may block: directly on a
/// plain or `spawn_blocking` thread; through `block_in_place` on a worker of a multi-threaded
/// runtime (the gateway calls the store there at startup, and `gateway run` opens it there);
/// on a scoped thread of its own from a current-thread runtime, where `block_in_place` is not
/// allowed.
fn blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Err(_) => f(),
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        Ok(_) => std::thread::scope(|s| match s.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
    }
}

/// Why connecting to `config` fails, as `": cause: ..."` (the error's whole chain), or nothing
/// when a direct attempt now succeeds.
fn connect_cause(config: &::postgres::Config, tls: PgTls) -> String {
    let config = config.clone();
    let attempt = blocking(move || config.connect(tls).map(drop));
    match attempt {
        Ok(()) => String::new(),
        Err(e) => {
            let mut shown = String::new();
            let mut cause: Option<&dyn std::error::Error> = Some(&e);
            while let Some(c) = cause {
                shown.push_str(": ");
                shown.push_str(&c.to_string());
                cause = c.source();
            }
            format!(" (cause{shown})")
        }
    }
}

/// The URL without user, password or options: what error messages may show.
fn redacted(config: &::postgres::Config) -> String {
    use ::postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let tls = if config.get_ssl_mode() == ::postgres::config::SslMode::Require {
        " (TLS)"
    } else {
        ""
    };
    format!(
        "postgresql://{}/{}{tls}",
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

impl PgStore {
    /// Connects (a pool of `pool_size`), and migrates the schema to [`PG_SCHEMA_VERSION`].
    /// Fails with [`StoreError::Unavailable`] (retryable) when no connection can be had within
    /// `connect_timeout`.
    pub fn open(
        url: &str,
        pool_size: u32,
        connect_timeout: Duration,
    ) -> Result<PgStore, StoreError> {
        PgStore::open_tls(url, pool_size, connect_timeout, None)
    }

    /// [`PgStore::open`], with an `sslmode=require` connection's certificate checked against
    /// the PEM file `ca_file` instead of the system's roots (see [`tls`]).
    pub fn open_tls(
        url: &str,
        pool_size: u32,
        connect_timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<PgStore, StoreError> {
        let mut config: ::postgres::Config =
            tls::normalize_sslmode(url)
                .parse()
                .map_err(|e| StoreError::Invalid {
                    field: "store.url",
                    message: format!("{e}"),
                })?;
        // libpq's default, an unverified attempt at TLS, is not made (see `tls`).
        if config.get_ssl_mode() == ::postgres::config::SslMode::Prefer {
            config.ssl_mode(::postgres::config::SslMode::Disable);
        }
        let tls = PgTls::new(ca_file).map_err(|message| StoreError::Invalid {
            field: "store.ca_file",
            message,
        })?;
        // Without a connect timeout of its own, a connection attempt to a host that drops
        // packets would hold one of the pool's threads for the kernel's TCP timeout.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("nearpath-gateway");
        }
        let location = redacted(&config);
        let manager = PostgresConnectionManager::new(config.clone(), tls.clone());
        // One connection is opened (and waited for) at start, proving the database reachable;
        // the others are opened as load needs them, so many gateways and tests stay well
        // inside the server's `max_connections`.
        let pool = r2d2::Pool::builder()
            .max_size(pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(connect_timeout)
            .build(manager)
            .map_err(|e| StoreError::Unavailable {
                // r2d2 keeps only the driver's top-level message ("error performing TLS
                // handshake"); one direct attempt says why (an untrusted certificate, a name
                // mismatch, a refused password).
                message: format!("{location}: {e}{}", connect_cause(&config, tls)),
            })?;
        let ledger = Arc::new(LedgerState {
            healthy: AtomicBool::new(true),
            failures: AtomicU64::new(0),
        });
        let (stop_probe, stopped) = mpsc::channel();
        let probe_thread = std::thread::Builder::new()
            .name("store-pg-probe".into())
            .spawn({
                let pool = pool.clone();
                let ledger = Arc::clone(&ledger);
                move || probe_loop(&pool, &ledger, &stopped)
            })
            .map_err(|source| StoreError::Io {
                op: "start ledger probe thread",
                source,
            })?;
        let store = PgStore {
            pool: Some(pool),
            ledger,
            stop_probe: Some(stop_probe),
            probe_thread: Some(probe_thread),
            location,
        };
        store.migrate()?;
        Ok(store)
    }

    /// The database, as `postgresql://host:port/dbname` (no credentials).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// A connection from the pool, waiting up to the connect timeout. Feature code should use
    /// [`PgStore::run`] instead, which may be called from any thread and retries transient
    /// failures; a connection from here must only be used off the async runtime's workers.
    pub(crate) fn conn(&self) -> Result<PgConn, StoreError> {
        let pool = self.pool.as_ref().ok_or(StoreError::Closed)?;
        pool.get().map_err(|e| StoreError::Unavailable {
            message: format!("{}: {e}", self.location),
        })
    }

    /// Runs `f` on a pooled connection, retrying transient failures as `retry` allows (so `f`
    /// may run more than once: keep it free of side effects outside the database). A failure
    /// to get a connection is not retried: the pool already waited the connect timeout. Safe
    /// on any thread (see `blocking`).
    pub(crate) fn run<T: Send>(
        &self,
        retry: Retry,
        mut f: impl FnMut(&mut PgConn) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        let mut attempt = 1;
        loop {
            // Checking a connection out (r2d2 tests it), using it and giving it back (a broken
            // one is closed) all run the driver.
            let result = blocking(|| {
                let mut conn = self.conn()?;
                f(&mut conn)
            });
            match result {
                Err(e)
                    if attempt < MAX_ATTEMPTS
                        && match retry {
                            Retry::Idempotent => {
                                matches!(e, StoreError::Postgres { .. }) && e.is_retryable()
                            }
                            Retry::IfRolledBack => rolled_back(&e),
                        } =>
                {
                    tracing::debug!(error = %e, attempt, "PostgreSQL store: transient failure, retrying");
                    // A short, growing pause lets a conflicting transaction finish or a
                    // restarting server come back.
                    std::thread::sleep(Duration::from_millis(20 * u64::from(attempt)));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Brings the schema to [`PG_SCHEMA_VERSION`] (see the module documentation).
    fn migrate(&self) -> Result<(), StoreError> {
        self.run(Retry::Idempotent, |conn| {
            // `CREATE TABLE IF NOT EXISTS` is not atomic against a concurrent one (both may
            // pass the check, and one then fails on the catalog's unique index): retry it.
            let mut tries = 0;
            loop {
                match conn.batch_execute(
                    "CREATE TABLE IF NOT EXISTS nearpath_schema (\
                       id BIGINT PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL); \
                     INSERT INTO nearpath_schema (id, version) VALUES (1, 0) \
                       ON CONFLICT (id) DO NOTHING",
                ) {
                    Ok(()) => break,
                    Err(e) if tries < 10 && is_create_race(&e) => tries += 1,
                    Err(e) => return Err(pg_err("create schema version table")(e)),
                }
            }
            let mut tx = conn.transaction().map_err(pg_err("begin migration"))?;
            let found: i64 = tx
                .query_one(
                    "SELECT version FROM nearpath_schema WHERE id = 1 FOR UPDATE",
                    &[],
                )
                .and_then(|r| r.try_get(0))
                .map_err(pg_err("read schema version"))?;
            if found > PG_SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew {
                    path: self.location.clone().into(),
                    found,
                    supported: PG_SCHEMA_VERSION,
                });
            }
            let Ok(first) = usize::try_from(found) else {
                return Err(StoreError::Invalid {
                    field: "nearpath_schema.version",
                    message: format!("negative schema version {found}"),
                });
            };
            if first == MIGRATIONS.len() {
                return Ok(());
            }
            for sql in &MIGRATIONS[first..] {
                tx.batch_execute(sql)
                    .map_err(pg_err("apply schema migration"))?;
            }
            tx.execute(
                "UPDATE nearpath_schema SET version = $1 WHERE id = 1",
                &[&PG_SCHEMA_VERSION],
            )
            .map_err(pg_err("set schema version"))?;
            tx.commit().map_err(pg_err("commit migration"))?;
            tracing::info!(from = found, to = PG_SCHEMA_VERSION, location = %self.location, "migrated the PostgreSQL store");
            Ok(())
        })
    }

    /// Inserts (`replace` = `None`) or rewrites a usage record, and tracks the ledger's health.
    fn write_usage(&self, record: UsageRecord, replace: Option<i64>) -> Result<i64, StoreError> {
        let row = UsageRow::new(record)?;
        let kind: &str = row.kind;
        // PostgreSQL TEXT cannot hold NUL; the record is kept with the character replaced.
        let text = |s: &str| s.replace('\0', "\u{FFFD}");
        let strings = [
            text(&row.request_id),
            text(&row.tenant),
            text(&row.api_key_id),
            text(&row.node_id),
            text(&row.operator_id),
            text(&row.workload),
            text(&row.outcome),
        ];
        let cols: [&(dyn ToSql + Sync); 18] = [
            &row.at_ms,
            &kind,
            &strings[0],
            &strings[1],
            &strings[2],
            &strings[3],
            &strings[4],
            &strings[5],
            &strings[6],
            &row.prompt_tokens,
            &row.completion_tokens,
            &row.ttft_ms,
            &row.duration_ms,
            &row.gpu_seconds,
            &row.frames,
            &row.bytes,
            &row.node_prompt_tokens,
            &row.node_completion_tokens,
        ];
        let result = match replace {
            // A single-statement transaction: acknowledged once PostgreSQL has committed it.
            // Not idempotent (a second insert would bill twice), so retried only when
            // PostgreSQL says it rolled back.
            None => self.run(Retry::IfRolledBack, |c| {
                c.query_one(
                    "INSERT INTO usage_records (at_ms, kind, request_id, tenant, api_key_id, \
                     node_id, operator_id, workload, outcome, prompt_tokens, completion_tokens, \
                     ttft_ms, duration_ms, gpu_seconds, frames, bytes, node_prompt_tokens, \
                     node_completion_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
                     $11, $12, $13, $14, $15, $16, $17, $18) RETURNING id",
                    &cols,
                )
                .and_then(|r| r.try_get::<_, i64>(0))
                .map_err(pg_err("insert usage record"))
            }),
            Some(id) => self.run(Retry::Idempotent, |c| {
                let mut params: Vec<&(dyn ToSql + Sync)> = cols.to_vec();
                params.push(&id);
                let changed = c
                    .execute(
                        "UPDATE usage_records SET at_ms = $1, kind = $2, request_id = $3, \
                         tenant = $4, api_key_id = $5, node_id = $6, operator_id = $7, \
                         workload = $8, outcome = $9, prompt_tokens = $10, \
                         completion_tokens = $11, ttft_ms = $12, duration_ms = $13, \
                         gpu_seconds = $14, frames = $15, bytes = $16, node_prompt_tokens = $17, \
                         node_completion_tokens = $18 WHERE id = $19",
                        &params,
                    )
                    .map_err(pg_err("update usage record"))?;
                if changed == 0 {
                    return Err(StoreError::NotFound {
                        kind: "usage record",
                        id: id.to_string(),
                    });
                }
                Ok(id)
            }),
        };
        match &result {
            Ok(_) => self.ledger.committed(),
            Err(e) if e.is_caller_error() => {}
            Err(e) => self.ledger.failed(e),
        }
        result
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop_probe.take();
        if let Some(thread) = self.probe_thread.take() {
            let _ = thread.join();
        }
        // Closing a connection runs the driver's runtime, which may not happen on a thread
        // driving async tasks (a gateway or test dropping its store there).
        if let Some(pool) = self.pool.take() {
            blocking(move || drop(pool));
        }
    }
}

/// Probes the ledger every [`PROBE_INTERVAL`] while it is unhealthy; ends when the store drops.
fn probe_loop(pool: &Pool, ledger: &LedgerState, stop: &mpsc::Receiver<()>) {
    loop {
        match stop.recv_timeout(PROBE_INTERVAL) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if ledger.healthy.load(Ordering::Acquire) {
            continue;
        }
        let at = saturating_i64(crate::clock::system_unix_ms());
        let result = pool
            .get()
            .map_err(|e| StoreError::Unavailable {
                message: e.to_string(),
            })
            .and_then(|mut c| {
                c.execute(
                    "INSERT INTO ledger_probe (id, at_ms) VALUES (1, $1) \
                     ON CONFLICT (id) DO UPDATE SET at_ms = EXCLUDED.at_ms",
                    &[&at],
                )
                .map_err(pg_err("write ledger probe"))
            });
        match result {
            Ok(_) => ledger.committed(),
            Err(e) => {
                ledger.failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "usage ledger (PostgreSQL) probe failed");
            }
        }
    }
}

/// The race of two `CREATE TABLE IF NOT EXISTS` (a duplicate in the catalog).
fn is_create_race(e: &::postgres::Error) -> bool {
    use ::postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::UNIQUE_VIOLATION
            || *c == SqlState::DUPLICATE_TABLE
            || *c == SqlState::DUPLICATE_OBJECT
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// Maps a driver error to [`StoreError::Postgres`] naming the operation.
pub(crate) fn pg_err(op: &'static str) -> impl FnOnce(::postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { op, source }
}

/// What a lookup of an id PostgreSQL cannot hold (one with NUL) answers: no such record.
fn not_found(kind: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        id: id.to_owned(),
    }
}

/// Refuses text PostgreSQL cannot store (NUL), as a caller error naming the field.
fn check_no_nul(field: &'static str, value: &str) -> Result<(), StoreError> {
    if value.contains('\0') {
        return Err(StoreError::Invalid {
            field,
            message: "must not contain NUL characters".into(),
        });
    }
    Ok(())
}

/// Converts a query bound (a time or a limit) to `BIGINT`, saturating: nothing stored lies
/// beyond `i64::MAX`, so the saturated bound selects the same rows.
fn saturating_i64<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// A column read that never panics: a type mismatch is an error naming the operation.
fn col<'a, T: ::postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
    op: &'static str,
) -> Result<T, StoreError> {
    row.try_get(idx).map_err(pg_err(op))
}

/// A non-negative counter column (negative values, which the store never writes, read as 0).
fn col_u64(row: &Row, idx: usize, op: &'static str) -> Result<u64, StoreError> {
    Ok(u64::try_from(col::<i64>(row, idx, op)?).unwrap_or(0))
}

fn col_opt_u64(row: &Row, idx: usize, op: &'static str) -> Result<Option<u64>, StoreError> {
    Ok(col::<Option<i64>>(row, idx, op)?.map(|v| u64::try_from(v).unwrap_or(0)))
}

fn col_u32(row: &Row, idx: usize, op: &'static str) -> Result<u32, StoreError> {
    let v: i64 = col(row, idx, op)?;
    Ok(u32::try_from(v.max(0)).unwrap_or(u32::MAX))
}

fn col_opt_u32(row: &Row, idx: usize, op: &'static str) -> Result<Option<u32>, StoreError> {
    Ok(col::<Option<i64>>(row, idx, op)?.map(|v| u32::try_from(v.max(0)).unwrap_or(u32::MAX)))
}

fn operator_from_row(r: &Row, at: usize) -> Result<Operator, StoreError> {
    let op = "read operator";
    Ok(Operator {
        id: col(r, at, op)?,
        name: col(r, at + 1, op)?,
        kyc_status: col::<String>(r, at + 2, op)?.parse()?,
        created_at_ms: col_u64(r, at + 3, op)?,
        updated_at_ms: col_u64(r, at + 4, op)?,
    })
}

fn token_from_row(r: &Row, at: usize) -> Result<EnrolmentToken, StoreError> {
    let op = "read enrolment token";
    Ok(EnrolmentToken {
        id: col(r, at, op)?,
        operator_id: col(r, at + 1, op)?,
        created_at_ms: col_u64(r, at + 2, op)?,
        prefix: col(r, at + 3, op)?,
        revoked: col(r, at + 4, op)?,
    })
}

fn api_key_from_row(r: &Row) -> Result<ApiKey, StoreError> {
    let op = "read api key";
    Ok(ApiKey {
        id: col(r, 0, op)?,
        tenant: col(r, 1, op)?,
        requests_per_minute: col_u32(r, 2, op)?,
        tokens_per_minute: col_u32(r, 3, op)?,
        created_at_ms: col_u64(r, 4, op)?,
        revoked: col(r, 5, op)?,
        prefix: col(r, 6, op)?,
        caps: KeyCaps {
            max_concurrent_streams: col_opt_u32(r, 7, op)?,
            max_concurrent_sessions: col_opt_u32(r, 8, op)?,
            session_starts_per_minute: col_opt_u32(r, 9, op)?,
        },
        policy: KeyPolicy {
            allowed_models: match col::<Option<String>>(r, 10, op)? {
                None => Vec::new(),
                Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Invalid {
                    field: "allowed_models",
                    message: format!("stored value is not a JSON list of names: {e}"),
                })?,
            },
            expires_at_ms: col_opt_u64(r, 11, op)?,
            budget_tokens_per_day: col_opt_u64(r, 12, op)?,
            budget_tokens_per_month: col_opt_u64(r, 13, op)?,
            budget_usd_per_day: col(r, 14, op)?,
            budget_usd_per_month: col(r, 15, op)?,
        },
    })
}

fn sla_from_row(r: &Row) -> Result<SlaRecord, StoreError> {
    let op = "read sla record";
    Ok(SlaRecord {
        node_id: col(r, 0, op)?,
        operator_id: col(r, 1, op)?,
        first_registered_at_ms: col_u64(r, 2, op)?,
        last_seen_at_ms: col_u64(r, 3, op)?,
        registered_ms: col_u64(r, 4, op)?,
        registrations: col_u64(r, 5, op)?,
        sessions_served: col_u64(r, 6, op)?,
        sessions_failed: col_u64(r, 7, op)?,
        heartbeat_misses: col_u64(r, 8, op)?,
        penalty_events: col_u64(r, 9, op)?,
        last_rtt_ms: col(r, 10, op)?,
    })
}

fn gpu_model_from_row(r: &Row) -> Result<GpuModelRecord, StoreError> {
    let op = "read gpu model";
    Ok(GpuModelRecord {
        model_key: col(r, 0, op)?,
        example: col(r, 1, op)?,
        class: col(r, 2, op)?,
        first_seen_at_ms: col_u64(r, 3, op)?,
        last_seen_at_ms: col_u64(r, 4, op)?,
        seen: col_u64(r, 5, op)?,
        classified_at_ms: col_opt_u64(r, 6, op)?,
    })
}

fn penalty_from_row(r: &Row) -> Result<PenaltyEvent, StoreError> {
    let op = "read penalty event";
    Ok(PenaltyEvent {
        id: col(r, 0, op)?,
        node_id: col(r, 1, op)?,
        operator_id: col(r, 2, op)?,
        at_ms: col_u64(r, 3, op)?,
        kind: col(r, 4, op)?,
        active_sessions: col_u32(r, 5, op)?,
        detail: col(r, 6, op)?,
    })
}

fn usage_from_row(r: &Row) -> Result<UsageRecord, StoreError> {
    let op = "read usage record";
    Ok(UsageRecord {
        id: Some(col(r, 0, op)?),
        at_ms: col_u64(r, 1, op)?,
        kind: col::<String>(r, 2, op)?.parse()?,
        request_id: col(r, 3, op)?,
        tenant: col(r, 4, op)?,
        api_key_id: col(r, 5, op)?,
        node_id: col(r, 6, op)?,
        operator_id: col(r, 7, op)?,
        workload: col(r, 8, op)?,
        outcome: col(r, 9, op)?,
        prompt_tokens: col_u64(r, 10, op)?,
        completion_tokens: col_u64(r, 11, op)?,
        ttft_ms: col(r, 12, op)?,
        duration_ms: col(r, 13, op)?,
        gpu_seconds: col(r, 14, op)?,
        frames: col_u64(r, 15, op)?,
        bytes: col_u64(r, 16, op)?,
        node_prompt_tokens: col_opt_u64(r, 17, op)?,
        node_completion_tokens: col_opt_u64(r, 18, op)?,
    })
}

fn totals_from_row(r: &Row) -> Result<UsageTotals, StoreError> {
    let op = "summarise usage";
    Ok(UsageTotals {
        key: col(r, 0, op)?,
        requests: col_u64(r, 1, op)?,
        prompt_tokens: col_u64(r, 2, op)?,
        completion_tokens: col_u64(r, 3, op)?,
        gpu_seconds: col(r, 4, op)?,
        frames: col_u64(r, 5, op)?,
        bytes: col_u64(r, 6, op)?,
        errors: col_u64(r, 7, op)?,
    })
}

/// Runs a query and maps every row, naming `op` in any error.
fn query_map<T>(
    client: &mut impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    op: &'static str,
    map: impl Fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    client
        .query(sql, params)
        .map_err(pg_err(op))?
        .iter()
        .map(map)
        .collect()
}

fn operator_exists(client: &mut impl GenericClient, id: &str) -> Result<bool, StoreError> {
    Ok(client
        .query_opt("SELECT 1 FROM operators WHERE id = $1", &[&id])
        .map_err(pg_err("look up operator"))?
        .is_some())
}

impl Store for PgStore {
    fn create_operator(&self, name: &str, kyc: KycStatus) -> Result<Operator, StoreError> {
        let name = check_name("name", name, MAX_NAME_CHARS)?;
        check_no_nul("name", name)?;
        let now = crate::clock::system_unix_ms();
        let op = Operator {
            id: new_id("op_"),
            name: name.to_owned(),
            kyc_status: kyc,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let at = to_i64("created_at_ms", now)?;
        self.run(Retry::IfRolledBack, |c| {
            c.execute(
                "INSERT INTO operators (id, name, kyc_status, created_at_ms, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $4)",
                &[&op.id, &op.name, &kyc.as_str(), &at],
            )
            .map_err(pg_err("insert operator"))
        })?;
        Ok(op)
    }

    fn get_operator(&self, id: &str) -> Result<Option<Operator>, StoreError> {
        if id.contains('\0') {
            return Ok(None);
        }
        self.run(Retry::Idempotent, |c| {
            c.query_opt(
                &format!("SELECT {OPERATOR_COLS} FROM operators WHERE id = $1"),
                &[&id],
            )
            .map_err(pg_err("get operator"))?
            .map(|r| operator_from_row(&r, 0))
            .transpose()
        })
    }

    fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        self.run(Retry::Idempotent, |c| {
            query_map(
                &mut **c,
                &format!("SELECT {OPERATOR_COLS} FROM operators ORDER BY seq"),
                &[],
                "list operators",
                |r| operator_from_row(r, 0),
            )
        })
    }

    fn set_operator_kyc(&self, id: &str, status: KycStatus) -> Result<Operator, StoreError> {
        if id.contains('\0') {
            return Err(not_found("operator", id));
        }
        let now = to_i64("updated_at_ms", crate::clock::system_unix_ms())?;
        self.run(Retry::Idempotent, |c| {
            c.query_opt(
                &format!(
                    "UPDATE operators SET kyc_status = $2, \
                     updated_at_ms = GREATEST($3, created_at_ms) \
                     WHERE id = $1 RETURNING {OPERATOR_COLS}"
                ),
                &[&id, &status.as_str(), &now],
            )
            .map_err(pg_err("set operator kyc"))?
            .map(|r| operator_from_row(&r, 0))
            .transpose()
        })?
        .ok_or_else(|| StoreError::NotFound {
            kind: "operator",
            id: id.to_owned(),
        })
    }

    fn create_enrolment_token(
        &self,
        operator_id: &str,
    ) -> Result<(EnrolmentToken, String), StoreError> {
        if operator_id.contains('\0') {
            return Err(not_found("operator", operator_id));
        }
        let secret = new_secret(ENROLMENT_TOKEN_PREFIX);
        let now = crate::clock::system_unix_ms();
        let token = EnrolmentToken {
            id: new_id("tok_"),
            operator_id: operator_id.to_owned(),
            created_at_ms: now,
            prefix: secret_display_prefix(&secret),
            revoked: false,
        };
        let at = to_i64("created_at_ms", now)?;
        let hash = hash_secret(&secret);
        self.run(Retry::IfRolledBack, |c| {
            // The foreign key refuses an unknown operator too, but as a constraint violation;
            // the lookup in the same transaction turns it into NotFound.
            let mut tx = c
                .transaction()
                .map_err(pg_err("begin create enrolment token"))?;
            if !operator_exists(&mut tx, operator_id)? {
                return Err(StoreError::NotFound {
                    kind: "operator",
                    id: operator_id.to_owned(),
                });
            }
            tx.execute(
                "INSERT INTO enrolment_tokens (id, operator_id, secret_hash, prefix, \
                 created_at_ms) VALUES ($1, $2, $3, $4, $5)",
                &[&token.id, &token.operator_id, &hash, &token.prefix, &at],
            )
            .map_err(pg_err("insert enrolment token"))?;
            tx.commit().map_err(pg_err("commit enrolment token"))
        })?;
        Ok((token, secret))
    }

    fn authenticate_enrolment_token(
        &self,
        secret: &str,
    ) -> Result<Option<(Operator, EnrolmentToken)>, StoreError> {
        if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
            // Nothing the store issues or accepts has this shape, so nothing can match.
            return Ok(None);
        }
        // An indexed lookup by digest (which never contains NUL, whatever the secret).
        let hash = hash_secret(secret);
        self.run(Retry::Idempotent, |c| {
            c.query_opt(
                "SELECT o.id, o.name, o.kyc_status, o.created_at_ms, o.updated_at_ms, \
                 t.id, t.operator_id, t.created_at_ms, t.prefix, t.revoked_at_ms IS NOT NULL \
                 FROM enrolment_tokens t JOIN operators o ON o.id = t.operator_id \
                 WHERE t.secret_hash = $1 AND t.revoked_at_ms IS NULL",
                &[&hash],
            )
            .map_err(pg_err("authenticate enrolment token"))?
            .map(|r| Ok((operator_from_row(&r, 0)?, token_from_row(&r, 5)?)))
            .transpose()
        })
    }

    fn revoke_enrolment_token(&self, id: &str) -> Result<(), StoreError> {
        if id.contains('\0') {
            return Err(not_found("enrolment_token", id));
        }
        let now = to_i64("revoked_at_ms", crate::clock::system_unix_ms())?;
        let changed = self.run(Retry::Idempotent, |c| {
            c.execute(
                "UPDATE enrolment_tokens SET revoked_at_ms = COALESCE(revoked_at_ms, $2) \
                 WHERE id = $1",
                &[&id, &now],
            )
            .map_err(pg_err("revoke enrolment token"))
        })?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                kind: "enrolment_token",
                id: id.to_owned(),
            });
        }
        Ok(())
    }

    fn list_enrolment_tokens(&self, operator_id: &str) -> Result<Vec<EnrolmentToken>, StoreError> {
        if operator_id.contains('\0') {
            return Err(not_found("operator", operator_id));
        }
        self.run(Retry::Idempotent, |c| {
            // One snapshot, so "operator exists" and its tokens agree.
            let mut tx = c
                .build_transaction()
                .isolation_level(::postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(pg_err("begin list enrolment tokens"))?;
            if !operator_exists(&mut tx, operator_id)? {
                return Err(StoreError::NotFound {
                    kind: "operator",
                    id: operator_id.to_owned(),
                });
            }
            query_map(
                &mut tx,
                &format!(
                    "SELECT {TOKEN_COLS} FROM enrolment_tokens WHERE operator_id = $1 \
                     ORDER BY seq"
                ),
                &[&operator_id],
                "list enrolment tokens",
                |r| token_from_row(r, 0),
            )
        })
    }

    fn create_api_key(
        &self,
        tenant: &str,
        requests_per_minute: u32,
        tokens_per_minute: u32,
    ) -> Result<(ApiKey, String), StoreError> {
        let secret = new_secret(API_KEY_PREFIX);
        let key =
            self.insert_api_key_secret(&secret, tenant, requests_per_minute, tokens_per_minute)?;
        Ok((key, secret))
    }

    fn insert_api_key_secret(
        &self,
        secret: &str,
        tenant: &str,
        requests_per_minute: u32,
        tokens_per_minute: u32,
    ) -> Result<ApiKey, StoreError> {
        check_secret(secret)?;
        let tenant = check_name("tenant", tenant, MAX_NAME_CHARS)?;
        check_no_nul("tenant", tenant)?;
        let hash = hash_secret(secret);
        let prefix = secret_display_prefix(secret);
        let (rpm, tpm) = (i64::from(requests_per_minute), i64::from(tokens_per_minute));
        // Idempotent by the secret: an insert that loses a race with another gateway (or that
        // is retried after an unknown commit outcome) returns the key that exists.
        self.run(Retry::Idempotent, |c| {
            let now = crate::clock::system_unix_ms();
            let at = to_i64("created_at_ms", now)?;
            let id = new_id("key_");
            let inserted = c
                .query_opt(
                    &format!(
                        "INSERT INTO api_keys (id, tenant, secret_hash, prefix, \
                         requests_per_minute, tokens_per_minute, created_at_ms) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (secret_hash) DO NOTHING RETURNING {API_KEY_COLS}"
                    ),
                    &[&id, &tenant, &hash, &prefix, &rpm, &tpm, &at],
                )
                .map_err(pg_err("insert api key"))?;
            let row = match inserted {
                Some(row) => row,
                None => c
                    .query_one(
                        &format!("SELECT {API_KEY_COLS} FROM api_keys WHERE secret_hash = $1"),
                        &[&hash],
                    )
                    .map_err(pg_err("look up api key"))?,
            };
            api_key_from_row(&row)
        })
    }

    fn authenticate_api_key(&self, secret: &str) -> Result<Option<ApiKey>, StoreError> {
        if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
            return Ok(None);
        }
        // As for enrolment tokens: an indexed lookup by digest, no secret comparison to time.
        let hash = hash_secret(secret);
        self.run(Retry::Idempotent, |c| {
            c.query_opt(
                &format!(
                    "SELECT {API_KEY_COLS} FROM api_keys \
                     WHERE secret_hash = $1 AND revoked_at_ms IS NULL"
                ),
                &[&hash],
            )
            .map_err(pg_err("authenticate api key"))?
            .map(|r| api_key_from_row(&r))
            .transpose()
        })
    }

    fn api_key_by_id(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        if !possible_id(id) {
            return Ok(None);
        }
        // The primary key's index: one row read, whatever the number of keys.
        self.run(Retry::Idempotent, |c| {
            c.query_opt(
                &format!(
                    "SELECT {API_KEY_COLS} FROM api_keys WHERE id = $1 AND revoked_at_ms IS NULL"
                ),
                &[&id],
            )
            .map_err(pg_err("look up api key by id"))?
            .map(|r| api_key_from_row(&r))
            .transpose()
        })
    }

    fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.run(Retry::Idempotent, |c| {
            query_map(
                &mut **c,
                &format!("SELECT {API_KEY_COLS} FROM api_keys ORDER BY seq"),
                &[],
                "list api keys",
                api_key_from_row,
            )
        })
    }

    fn revoke_api_key(&self, id: &str) -> Result<(), StoreError> {
        if id.contains('\0') {
            return Err(not_found("api_key", id));
        }
        let now = to_i64("revoked_at_ms", crate::clock::system_unix_ms())?;
        let changed = self.run(Retry::Idempotent, |c| {
            c.execute(
                "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1",
                &[&id, &now],
            )
            .map_err(pg_err("revoke api key"))
        })?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                kind: "api_key",
                id: id.to_owned(),
            });
        }
        Ok(())
    }

    fn update_api_key(&self, id: &str, update: ApiKeyUpdate) -> Result<ApiKey, StoreError> {
        if id.contains('\0') {
            return Err(not_found("api_key", id));
        }
        // A cap of 0 would lock the key out silently; revoking it says so.
        for (field, v) in [
            ("requests_per_minute", update.requests_per_minute),
            ("tokens_per_minute", update.tokens_per_minute),
            (
                "max_concurrent_streams",
                update.max_concurrent_streams.flatten(),
            ),
            (
                "max_concurrent_sessions",
                update.max_concurrent_sessions.flatten(),
            ),
            (
                "session_starts_per_minute",
                update.session_starts_per_minute.flatten(),
            ),
        ] {
            if v == Some(0) {
                return Err(StoreError::Invalid {
                    field,
                    message: "must be at least 1 (revoke the key to stop it)".into(),
                });
            }
        }
        if let Some(list) = &update.allowed_models {
            for m in list {
                check_no_nul("allowed_models", m)?;
            }
        }
        // Read, apply and write in one transaction with the row locked, so that two admins
        // changing different fields of one key on two gateways both take effect.
        self.run(Retry::Idempotent, |c| {
            let mut tx = c.transaction().map_err(pg_err("begin update api key"))?;
            let row = tx
                .query_opt(
                    &format!("SELECT {API_KEY_COLS} FROM api_keys WHERE id = $1 FOR UPDATE"),
                    &[&id],
                )
                .map_err(pg_err("look up api key"))?
                .ok_or_else(|| StoreError::NotFound {
                    kind: "api_key",
                    id: id.to_owned(),
                })?;
            let mut key = api_key_from_row(&row)?;
            update.apply(&mut key);
            key.policy.validate()?;
            let p = &key.policy;
            let allowed = if p.allowed_models.is_empty() {
                None
            } else {
                Some(
                    serde_json::to_string(&p.allowed_models).map_err(|e| StoreError::Invalid {
                        field: "allowed_models",
                        message: e.to_string(),
                    })?,
                )
            };
            let opt = |field: &'static str, v: Option<u64>| v.map(|v| to_i64(field, v)).transpose();
            let opt32 = |v: Option<u32>| v.map(i64::from);
            tx.execute(
                "UPDATE api_keys SET requests_per_minute = $2, tokens_per_minute = $3, \
                 max_concurrent_streams = $4, max_concurrent_sessions = $5, \
                 session_starts_per_minute = $6, allowed_models = $7, expires_at_ms = $8, \
                 budget_tokens_per_day = $9, budget_tokens_per_month = $10, \
                 budget_usd_per_day = $11, budget_usd_per_month = $12 WHERE id = $1",
                &[
                    &id,
                    &i64::from(key.requests_per_minute),
                    &i64::from(key.tokens_per_minute),
                    &opt32(key.caps.max_concurrent_streams),
                    &opt32(key.caps.max_concurrent_sessions),
                    &opt32(key.caps.session_starts_per_minute),
                    &allowed,
                    &opt("expires_at_ms", p.expires_at_ms)?,
                    &opt("budget_tokens_per_day", p.budget_tokens_per_day)?,
                    &opt("budget_tokens_per_month", p.budget_tokens_per_month)?,
                    &p.budget_usd_per_day,
                    &p.budget_usd_per_month,
                ],
            )
            .map_err(pg_err("update api key"))?;
            tx.commit().map_err(pg_err("commit api key update"))?;
            Ok(key)
        })
    }

    fn claim_node_id(
        &self,
        node_id: &str,
        operator_id: &str,
        at_ms: u64,
    ) -> Result<String, StoreError> {
        check_id("node_id", node_id, false)?;
        check_id("operator_id", operator_id, false)?;
        check_no_nul("node_id", node_id)?;
        check_no_nul("operator_id", operator_id)?;
        let at = to_i64("at_ms", at_ms)?;
        // The common case (a known node coming back) is a read; only a first claim writes.
        if let Some(owner) = self.node_owner(node_id)? {
            return Ok(owner);
        }
        // Two statements, each its own transaction: of operators racing for a fresh id (here
        // or on another gateway) exactly one inserts, the others' `DO NOTHING` waits for that
        // insert to commit, and the read that follows (a new snapshot) sees the winner.
        self.run(Retry::Idempotent, |c| {
            c.execute(
                "INSERT INTO node_ids (node_id, operator_id, claimed_at_ms) \
                 VALUES ($1, $2, $3) ON CONFLICT (node_id) DO NOTHING",
                &[&node_id, &operator_id, &at],
            )
            .map_err(pg_err("claim node id"))?;
            c.query_one(
                "SELECT operator_id FROM node_ids WHERE node_id = $1",
                &[&node_id],
            )
            .and_then(|r| r.try_get(0))
            .map_err(pg_err("read node id owner"))
        })
    }

    fn node_owner(&self, node_id: &str) -> Result<Option<String>, StoreError> {
        if node_id.contains('\0') {
            return Ok(None);
        }
        self.run(Retry::Idempotent, |c| {
            c.query_opt(
                "SELECT operator_id FROM node_ids WHERE node_id = $1",
                &[&node_id],
            )
            .map_err(pg_err("read node id owner"))?
            .map(|r| col(&r, 0, "read node id owner"))
            .transpose()
        })
    }

    fn sla_apply(
        &self,
        node_id: &str,
        operator_id: &str,
        delta: SlaDelta,
    ) -> Result<SlaRecord, StoreError> {
        check_id("node_id", node_id, false)?;
        check_id("operator_id", operator_id, false)?;
        check_no_nul("node_id", node_id)?;
        check_no_nul("operator_id", operator_id)?;
        if let Some(rtt) = delta.last_rtt_ms {
            check_measure("last_rtt_ms", rtt)?;
        }
        let seen = to_i64("seen_at_ms", delta.seen_at_ms)?;
        let registered = to_i64("registered_ms", delta.registered_ms)?;
        let registrations = to_i64("registrations", delta.registrations)?;
        let served = to_i64("sessions_served", delta.sessions_served)?;
        let failed = to_i64("sessions_failed", delta.sessions_failed)?;
        let misses = to_i64("heartbeat_misses", delta.heartbeat_misses)?;
        // Increments: retried only when PostgreSQL rolled the statement back.
        self.run(Retry::IfRolledBack, |c| {
            let row = c
                .query_one(
                    &format!(
                        "INSERT INTO sla_records ({SLA_COLS}) \
                         VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $8, 0, $9) \
                         ON CONFLICT (operator_id, node_id) DO UPDATE SET \
                           last_seen_at_ms = GREATEST(sla_records.last_seen_at_ms, \
                             EXCLUDED.last_seen_at_ms), \
                           registered_ms = sla_records.registered_ms + EXCLUDED.registered_ms, \
                           registrations = sla_records.registrations + EXCLUDED.registrations, \
                           sessions_served = sla_records.sessions_served \
                             + EXCLUDED.sessions_served, \
                           sessions_failed = sla_records.sessions_failed \
                             + EXCLUDED.sessions_failed, \
                           heartbeat_misses = sla_records.heartbeat_misses \
                             + EXCLUDED.heartbeat_misses, \
                           last_rtt_ms = COALESCE(EXCLUDED.last_rtt_ms, sla_records.last_rtt_ms) \
                         RETURNING {SLA_COLS}"
                    ),
                    &[
                        &node_id,
                        &operator_id,
                        &seen,
                        &registered,
                        &registrations,
                        &served,
                        &failed,
                        &misses,
                        &delta.last_rtt_ms,
                    ],
                )
                .map_err(pg_err("apply sla delta"))?;
            sla_from_row(&row)
        })
    }

    fn sla_get(&self, operator_id: &str, node_id: &str) -> Result<Option<SlaRecord>, StoreError> {
        if operator_id.contains('\0') || node_id.contains('\0') {
            return Ok(None);
        }
        self.run(Retry::Idempotent, |c| {
            c.query_opt(
                &format!(
                    "SELECT {SLA_COLS} FROM sla_records WHERE operator_id = $1 AND node_id = $2"
                ),
                &[&operator_id, &node_id],
            )
            .map_err(pg_err("get sla record"))?
            .map(|r| sla_from_row(&r))
            .transpose()
        })
    }

    fn sla_list(&self) -> Result<Vec<SlaRecord>, StoreError> {
        self.run(Retry::Idempotent, |c| {
            query_map(
                &mut **c,
                &format!("SELECT {SLA_COLS} FROM sla_records ORDER BY node_id, operator_id"),
                &[],
                "list sla records",
                sla_from_row,
            )
        })
    }

    fn record_penalty(
        &self,
        node_id: &str,
        operator_id: &str,
        at_ms: u64,
        kind: &str,
        active_sessions: u32,
        detail: &str,
    ) -> Result<PenaltyEvent, StoreError> {
        check_id("node_id", node_id, false)?;
        check_id("operator_id", operator_id, false)?;
        check_id("kind", kind, false)?;
        check_text("detail", detail)?;
        for (field, v) in [
            ("node_id", node_id),
            ("operator_id", operator_id),
            ("kind", kind),
            ("detail", detail),
        ] {
            check_no_nul(field, v)?;
        }
        let at = to_i64("at_ms", at_ms)?;
        let sessions = i64::from(active_sessions);
        // The event and the SLA count in one transaction: both or neither.
        let id = self.run(Retry::IfRolledBack, |c| {
            let mut tx = c.transaction().map_err(pg_err("begin record penalty"))?;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO penalty_events (node_id, operator_id, at_ms, kind, \
                     active_sessions, detail) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                    &[&node_id, &operator_id, &at, &kind, &sessions, &detail],
                )
                .and_then(|r| r.try_get(0))
                .map_err(pg_err("insert penalty event"))?;
            tx.execute(
                &format!(
                    "INSERT INTO sla_records ({SLA_COLS}) \
                     VALUES ($1, $2, $3, $3, 0, 0, 0, 0, 0, 1, NULL) \
                     ON CONFLICT (operator_id, node_id) DO UPDATE SET \
                       penalty_events = sla_records.penalty_events + 1"
                ),
                &[&node_id, &operator_id, &at],
            )
            .map_err(pg_err("count penalty in sla record"))?;
            tx.commit().map_err(pg_err("commit penalty event"))?;
            Ok(id)
        })?;
        Ok(PenaltyEvent {
            id,
            node_id: node_id.to_owned(),
            operator_id: operator_id.to_owned(),
            at_ms,
            kind: kind.to_owned(),
            active_sessions,
            detail: detail.to_owned(),
        })
    }

    fn list_penalties(
        &self,
        node_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PenaltyEvent>, StoreError> {
        if node_id.is_some_and(|n| n.contains('\0')) {
            return Ok(Vec::new());
        }
        let limit = saturating_i64(limit);
        self.run(Retry::Idempotent, |c| {
            query_map(
                &mut **c,
                &format!(
                    "SELECT {PENALTY_COLS} FROM penalty_events \
                     WHERE $1::TEXT IS NULL OR node_id = $1 ORDER BY id DESC LIMIT $2"
                ),
                &[&node_id, &limit],
                "list penalties",
                penalty_from_row,
            )
        })
    }

    fn penalties_since(
        &self,
        operator_id: &str,
        node_id: &str,
        since_ms: u64,
    ) -> Result<u64, StoreError> {
        if operator_id.contains('\0') || node_id.contains('\0') {
            return Ok(0);
        }
        let since = saturating_i64(since_ms);
        self.run(Retry::Idempotent, |c| {
            let row = c
                .query_one(
                    "SELECT count(*) FROM penalty_events \
                     WHERE operator_id = $1 AND node_id = $2 AND at_ms >= $3",
                    &[&operator_id, &node_id, &since],
                )
                .map_err(pg_err("count penalties"))?;
            col_u64(&row, 0, "count penalties")
        })
    }

    fn gpu_model_class(&self, model_key: &str) -> Result<Option<String>, StoreError> {
        if model_key.contains('\0') {
            return Ok(None);
        }
        self.run(Retry::Idempotent, |c| {
            Ok(c.query_opt(
                "SELECT class FROM gpu_models WHERE model_key = $1",
                &[&model_key],
            )
            .map_err(pg_err("read gpu model class"))?
            .map(|r| col::<Option<String>>(&r, 0, "read gpu model class"))
            .transpose()?
            .flatten())
        })
    }

    fn note_unclassified_gpu_model(
        &self,
        model_key: &str,
        example: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        check_id("model_key", model_key, false)?;
        check_id("example", example, true)?;
        check_no_nul("model_key", model_key)?;
        check_no_nul("example", example)?;
        let at = to_i64("at_ms", at_ms)?;
        self.run(Retry::IfRolledBack, |c| {
            c.execute(
                "INSERT INTO gpu_models (model_key, example, class, first_seen_at_ms, \
                 last_seen_at_ms, seen, classified_at_ms) VALUES ($1, $2, NULL, $3, $3, 1, NULL) \
                 ON CONFLICT (model_key) DO UPDATE SET \
                   last_seen_at_ms = GREATEST(gpu_models.last_seen_at_ms, \
                     EXCLUDED.last_seen_at_ms), \
                   seen = gpu_models.seen + 1",
                &[&model_key, &example, &at],
            )
            .map_err(pg_err("note gpu model"))
        })?;
        Ok(())
    }

    fn set_gpu_model_class(
        &self,
        model_key: &str,
        example: &str,
        class: &str,
        at_ms: u64,
    ) -> Result<GpuModelRecord, StoreError> {
        check_id("model", model_key, false)?;
        check_id("model", example, true)?;
        check_id("class", class, false)?;
        check_no_nul("model", model_key)?;
        check_no_nul("model", example)?;
        check_no_nul("class", class)?;
        let at = to_i64("at_ms", at_ms)?;
        self.run(Retry::Idempotent, |c| {
            let row = c
                .query_one(
                    &format!(
                        "INSERT INTO gpu_models ({GPU_MODEL_COLS}) \
                         VALUES ($1, $2, $3, $4, $4, 0, $4) \
                         ON CONFLICT (model_key) DO UPDATE SET \
                           class = EXCLUDED.class, classified_at_ms = EXCLUDED.classified_at_ms \
                         RETURNING {GPU_MODEL_COLS}"
                    ),
                    &[&model_key, &example, &class, &at],
                )
                .map_err(pg_err("classify gpu model"))?;
            gpu_model_from_row(&row)
        })
    }

    fn list_gpu_models(&self) -> Result<Vec<GpuModelRecord>, StoreError> {
        self.run(Retry::Idempotent, |c| {
            query_map(
                &mut **c,
                &format!("SELECT {GPU_MODEL_COLS} FROM gpu_models ORDER BY model_key"),
                &[],
                "list gpu models",
                gpu_model_from_row,
            )
        })
    }

    fn append_usage(&self, record: UsageRecord) -> Result<i64, StoreError> {
        self.write_usage(record, None)
    }

    fn update_usage(&self, id: i64, record: UsageRecord) -> Result<i64, StoreError> {
        self.write_usage(record, Some(id))
    }

    fn ledger_health(&self) -> LedgerHealth {
        LedgerHealth {
            healthy: self.ledger.healthy.load(Ordering::Acquire),
            write_failures: self.ledger.failures.load(Ordering::Relaxed),
        }
    }

    fn usage_summary(&self, since_ms: Option<u64>) -> Result<UsageSummary, StoreError> {
        let since = saturating_i64(since_ms.unwrap_or(0));
        self.run(Retry::Idempotent, |c| {
            // One snapshot, so both groupings describe the same set of records.
            let mut tx = c
                .build_transaction()
                .isolation_level(::postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(pg_err("begin usage summary"))?;
            let mut totals = |group: &str, filter: &str| {
                query_map(
                    &mut tx,
                    &format!(
                        "SELECT {group}, count(*), CAST(SUM(prompt_tokens) AS BIGINT), \
                         CAST(SUM(completion_tokens) AS BIGINT), \
                         COALESCE(SUM(gpu_seconds), 0.0), CAST(SUM(frames) AS BIGINT), \
                         CAST(SUM(bytes) AS BIGINT), \
                         CAST(SUM(CASE WHEN outcome IN ('ok', 'cancelled', 'in_progress') \
                           THEN 0 ELSE 1 END) AS BIGINT) \
                         FROM usage_records WHERE at_ms >= $1 {filter} \
                         GROUP BY {group} ORDER BY {group}"
                    ),
                    &[&since],
                    "summarise usage",
                    totals_from_row,
                )
            };
            let by_tenant = totals("tenant", "")?;
            let by_node = totals("node_id", "AND node_id <> ''")?;
            Ok(UsageSummary { by_tenant, by_node })
        })
    }

    fn list_usage(&self, limit: usize) -> Result<Vec<UsageRecord>, StoreError> {
        let limit = saturating_i64(limit);
        self.run(Retry::Idempotent, |c| {
            query_map(
                &mut **c,
                &format!("SELECT {USAGE_COLS} FROM usage_records ORDER BY id DESC LIMIT $1"),
                &[&limit],
                "list usage",
                usage_from_row,
            )
        })
    }

    fn key_usage_by_day(
        &self,
        api_key_id: Option<&str>,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<KeyDayUsage>, StoreError> {
        const DAY_MS: i64 = 86_400_000;
        if api_key_id.is_some_and(|k| k.contains('\0')) {
            return Ok(Vec::new());
        }
        let (from, to) = (saturating_i64(from_ms), saturating_i64(to_ms));
        // The day's first millisecond is grouped on, and divided here: integer division is
        // not portable (CockroachDB's `/` on integers gives a decimal).
        self.run(Retry::Idempotent, |c| {
            query_map(
                &mut **c,
                "SELECT api_key_id, at_ms - (at_ms % 86400000) AS day_start, workload, count(*), \
                 CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT) \
                 FROM usage_records \
                 WHERE kind = 'inference' AND at_ms >= $1 AND at_ms < $2 \
                 AND ($3::TEXT IS NULL OR api_key_id = $3) \
                 GROUP BY api_key_id, day_start, workload \
                 ORDER BY api_key_id, day_start, workload",
                &[&from, &to, &api_key_id],
                "key usage by day",
                |r| {
                    let op = "key usage by day";
                    Ok(KeyDayUsage {
                        api_key_id: col(r, 0, op)?,
                        day: col::<i64>(r, 1, op)?.div_euclid(DAY_MS),
                        model: col(r, 2, op)?,
                        requests: col_u64(r, 3, op)?,
                        prompt_tokens: col_u64(r, 4, op)?,
                        completion_tokens: col_u64(r, 5, op)?,
                    })
                },
            )
        })
    }
    // ---- Federation: each feature adds its overrides below, delegating to an inherent
    // method in its own file under `store/pg/`.
    fn lease_units(
        &self,
        key_id: &str,
        pool: &str,
        window_start_ms: u64,
        want: u64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        self.pg_lease_units(key_id, pool, window_start_ms, want, limit)
    }
    fn publish_holds(&self, gateway_id: &str, holds: &[FleetHold]) -> Result<(), StoreError> {
        self.pg_publish_holds(gateway_id, holds)
    }
    fn fleet_holds(&self, key_id: Option<&str>, now_ms: u64) -> Result<Vec<FleetHold>, StoreError> {
        self.pg_fleet_holds(key_id, now_ms)
    }
    fn prune_limits(&self, before_window_ms: u64, now_ms: u64) -> Result<u64, StoreError> {
        self.pg_prune_limits(before_window_ms, now_ms)
    }
    fn federation_secret(&self, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.pg_federation_secret(candidate)
    }
    fn put_session_dir(&self, entry: &SessionDirEntry) -> Result<(), StoreError> {
        self.pg_put_session_dir(entry)
    }
    fn get_session_dir(&self, session_id: u64) -> Result<Option<SessionDirEntry>, StoreError> {
        self.pg_get_session_dir(session_id)
    }
    fn remove_session_dir(&self, session_id: u64, gateway_id: &str) -> Result<(), StoreError> {
        self.pg_remove_session_dir(session_id, gateway_id)
    }
    fn gateway_heartbeat(&self, record: &GatewayRecord) -> Result<(), StoreError> {
        self.dir_heartbeat(record)
    }
    fn gateway_join(
        &self,
        record: &GatewayRecord,
        now_ms: u64,
    ) -> Result<Option<GatewayRecord>, StoreError> {
        self.dir_join(record, now_ms)
    }
    fn gateway_leave(&self, gateway_id: &str) -> Result<(), StoreError> {
        self.dir_leave(gateway_id)
    }
    fn list_gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        self.dir_list_gateways()
    }
    fn publish_nodes(&self, gateway_id: &str, nodes: &[NodeDirEntry]) -> Result<(), StoreError> {
        self.dir_publish_nodes(gateway_id, nodes)
    }
    fn list_node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        self.dir_list_nodes()
    }
    fn record_check(&self, rec: &CheckRecordRow) -> Result<(), StoreError> {
        self.chk_record(rec)
    }
    fn checks_of(&self, node_id: &str, limit: usize) -> Result<Vec<CheckRecordRow>, StoreError> {
        self.chk_list(node_id, limit)
    }
    fn latest_votes(&self, node_id: &str) -> Result<Vec<CheckVote>, StoreError> {
        self.chk_votes(node_id)
    }
    fn prune_checks(&self, older_than_ms: u64) -> Result<u64, StoreError> {
        self.chk_prune(older_than_ms)
    }
    fn record_node_gpus(
        &self,
        node_id: &str,
        gateway_id: &str,
        gpus: &[GpuIdentityRow],
        seen_at_ms: u64,
    ) -> Result<GpuSetChange, StoreError> {
        self.gpu_record(node_id, gateway_id, gpus, seen_at_ms)
    }
    fn node_gpus(&self, node_id: &str) -> Result<Vec<GpuIdentityRow>, StoreError> {
        self.gpu_list(node_id)
    }
    fn gpu_uuid_holders(
        &self,
        uuids: &[String],
        live_since_ms: u64,
    ) -> Result<Vec<GpuHolder>, StoreError> {
        self.gpu_holders(uuids, live_since_ms)
    }
    fn touch_node_gpus(&self, node_id: &str, seen_at_ms: u64) -> Result<bool, StoreError> {
        self.gpu_touch(node_id, seen_at_ms)
    }
    fn release_node_gpus(
        &self,
        node_id: &str,
        gateway_id: &str,
        seen_at_ms: u64,
    ) -> Result<bool, StoreError> {
        self.gpu_release(node_id, gateway_id, seen_at_ms)
    }
    fn prune_node_gpus(&self, seen_before_ms: u64) -> Result<u64, StoreError> {
        self.gpu_prune(seen_before_ms)
    }
    fn save_verification(
        &self,
        node_id: &str,
        state: &str,
        reasons_json: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        self.ver_save(node_id, state, reasons_json, at_ms)
    }
    fn load_verification(&self, node_id: &str) -> Result<Option<VerificationSnapshot>, StoreError> {
        self.ver_load(node_id)
    }
}
