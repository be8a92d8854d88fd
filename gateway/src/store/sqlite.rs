//! [`SqliteStore`]: the [`Store`] on one SQLite file, for a single gateway.
//!
//! Two connections share the file. The *main* connection, behind a mutex, serves every read and
//! every write except usage appends. A dedicated *writer* thread owns the second connection and
//! appends usage records with group commit: it takes every record queued while the previous
//! commit was running, inserts them in one transaction, commits once (one `fsync`) and then wakes
//! each caller with its id. Under load the cost of a commit is shared by the whole batch; alone,
//! a caller waits for exactly one commit, as it would without batching.
//!
//! Durability: the database runs in WAL mode with `synchronous=FULL`, so a commit has reached the
//! disk (the WAL is fsynced) before any caller is told it succeeded. `NORMAL` would already survive
//! `kill -9` of the gateway (the OS still holds the written pages), but not a power loss or kernel
//! crash, and metered usage is billing data; group commit keeps the cost of `FULL` affordable.

use super::UsageThen;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};

use super::SessionDirEntry;
use super::{check_holds, check_lease, FleetHold};
mod checker;
mod directory;

use super::{
    check_id, check_measure, check_name, check_text, hash_secret, new_id, new_secret, possible_id,
    secret_display_prefix, to_i64, ApiKey, ApiKeyUpdate, EnrolmentToken, GpuModelRecord, KeyCaps,
    KeyDayUsage, KeyPolicy, KycStatus, LedgerHealth, Operator, PenaltyEvent, SlaDelta, SlaRecord,
    Store, StoreError, UsageKind, UsageRecord, UsageSummary, UsageTotals, API_KEY_PREFIX,
    ENROLMENT_TOKEN_PREFIX, MAX_NAME_CHARS, MAX_SECRET_BYTES,
};

/// How long a connection waits for another connection's lock before failing with a retryable
/// error.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `PRAGMA application_id` of gateway databases ("NPGW"), so that the store never mistakes some
/// other application's SQLite file for its own.
const APPLICATION_ID: i32 = 0x4E50_4757;

/// The most records the writer commits in one transaction; bounds how long one commit holds the
/// write lock and how much a failed batch has to retry.
const MAX_BATCH: usize = 1024;

/// Schema migrations: `MIGRATIONS[i]` takes `user_version` i to i + 1. Append, never edit.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE operators (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    kyc_status     TEXT NOT NULL CHECK (kyc_status IN ('pending', 'verified', 'suspended')),
    created_at_ms  INTEGER NOT NULL,
    updated_at_ms  INTEGER NOT NULL
) STRICT;

CREATE TABLE enrolment_tokens (
    id             TEXT PRIMARY KEY,
    operator_id    TEXT NOT NULL REFERENCES operators (id),
    secret_hash    TEXT NOT NULL UNIQUE,
    prefix         TEXT NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    revoked_at_ms  INTEGER
) STRICT;
CREATE INDEX enrolment_tokens_by_operator ON enrolment_tokens (operator_id);

CREATE TABLE api_keys (
    id                   TEXT PRIMARY KEY,
    tenant               TEXT NOT NULL,
    secret_hash          TEXT NOT NULL UNIQUE,
    prefix               TEXT NOT NULL,
    requests_per_minute  INTEGER NOT NULL,
    tokens_per_minute    INTEGER NOT NULL,
    created_at_ms        INTEGER NOT NULL,
    revoked_at_ms        INTEGER
) STRICT;

-- SLA records, penalties and usage are history: they reference operators and nodes by id
-- without foreign keys, so that the ledger never refuses a record because of an admin change.
CREATE TABLE sla_records (
    node_id                 TEXT PRIMARY KEY,
    operator_id             TEXT NOT NULL,
    first_registered_at_ms  INTEGER NOT NULL,
    last_seen_at_ms         INTEGER NOT NULL,
    registered_ms           INTEGER NOT NULL,
    registrations           INTEGER NOT NULL,
    sessions_served         INTEGER NOT NULL,
    sessions_failed         INTEGER NOT NULL,
    heartbeat_misses        INTEGER NOT NULL,
    penalty_events          INTEGER NOT NULL,
    last_rtt_ms             REAL
) STRICT;

-- AUTOINCREMENT: ids of penalties and usage records are never reused, even after old rows are
-- pruned, so an id acknowledged to a caller names one record forever.
CREATE TABLE penalty_events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id          TEXT NOT NULL,
    operator_id      TEXT NOT NULL,
    at_ms            INTEGER NOT NULL,
    kind             TEXT NOT NULL,
    active_sessions  INTEGER NOT NULL,
    detail           TEXT NOT NULL
) STRICT;
CREATE INDEX penalty_events_by_node ON penalty_events (node_id, at_ms);

CREATE TABLE usage_records (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms              INTEGER NOT NULL,
    kind               TEXT NOT NULL CHECK (kind IN ('inference', 'game')),
    request_id         TEXT NOT NULL,
    tenant             TEXT NOT NULL,
    api_key_id         TEXT NOT NULL,
    node_id            TEXT NOT NULL,
    operator_id        TEXT NOT NULL,
    workload           TEXT NOT NULL,
    outcome            TEXT NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    ttft_ms            REAL,
    duration_ms        REAL NOT NULL,
    gpu_seconds        REAL NOT NULL,
    frames             INTEGER NOT NULL,
    bytes              INTEGER NOT NULL
) STRICT;
CREATE INDEX usage_records_by_time ON usage_records (at_ms);
"#,
    // Issue 9: per-key caps (NULL: the gateway-wide default), the node's own usage claims kept
    // beside the gateway's billed counts, and the row the usage writer rewrites to probe the ledger
    // while it cannot commit.
    r#"
ALTER TABLE api_keys ADD COLUMN max_concurrent_streams INTEGER;
ALTER TABLE api_keys ADD COLUMN max_concurrent_sessions INTEGER;
ALTER TABLE api_keys ADD COLUMN session_starts_per_minute INTEGER;
ALTER TABLE usage_records ADD COLUMN node_prompt_tokens INTEGER;
ALTER TABLE usage_records ADD COLUMN node_completion_tokens INTEGER;
CREATE TABLE ledger_probe (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    at_ms  INTEGER NOT NULL
) STRICT;
"#,
    // 3: node ids belong to their first operator forever; SLA records are keyed by (operator, node);
    // GPU models seen unclassified or classified by an admin.
    r#"
CREATE TABLE node_ids (
    node_id        TEXT PRIMARY KEY,
    operator_id    TEXT NOT NULL,
    claimed_at_ms  INTEGER NOT NULL
) STRICT;

-- Existing ids go to the operator of their earliest usage record (the first that served under
-- the id), else to the operator their SLA record names (the last that registered it).
INSERT INTO node_ids (node_id, operator_id, claimed_at_ms)
SELECT s.node_id, coalesce(f.operator_id, s.operator_id), s.first_registered_at_ms
FROM sla_records s
LEFT JOIN (
    SELECT node_id, operator_id, min(at_ms) AS at_ms FROM usage_records
    WHERE node_id <> '' AND operator_id <> '' GROUP BY node_id
) f ON f.node_id = s.node_id;

CREATE TABLE sla_records_by_operator (
    node_id                 TEXT NOT NULL,
    operator_id             TEXT NOT NULL,
    first_registered_at_ms  INTEGER NOT NULL,
    last_seen_at_ms         INTEGER NOT NULL,
    registered_ms           INTEGER NOT NULL,
    registrations           INTEGER NOT NULL,
    sessions_served         INTEGER NOT NULL,
    sessions_failed         INTEGER NOT NULL,
    heartbeat_misses        INTEGER NOT NULL,
    penalty_events          INTEGER NOT NULL,
    last_rtt_ms             REAL,
    PRIMARY KEY (operator_id, node_id)
) STRICT;
INSERT INTO sla_records_by_operator SELECT * FROM sla_records;
DROP TABLE sla_records;
ALTER TABLE sla_records_by_operator RENAME TO sla_records;
CREATE INDEX sla_records_by_node ON sla_records (node_id);

DROP INDEX penalty_events_by_node;
CREATE INDEX penalty_events_by_node ON penalty_events (operator_id, node_id, at_ms);
CREATE INDEX penalty_events_by_node_id ON penalty_events (node_id);

CREATE TABLE gpu_models (
    model_key         TEXT PRIMARY KEY,
    example           TEXT NOT NULL,
    class             TEXT,
    first_seen_at_ms  INTEGER NOT NULL,
    last_seen_at_ms   INTEGER NOT NULL,
    seen              INTEGER NOT NULL,
    classified_at_ms  INTEGER
) STRICT;
"#,
    // 4 (issue 12): per-key model allow-list (a JSON array of names and `prefix*` patterns;
    // NULL: every model), expiry and budgets (NULL: none); usage by key and time, for the
    // budgets' spend at start and the key usage report.
    r#"
ALTER TABLE api_keys ADD COLUMN allowed_models TEXT;
ALTER TABLE api_keys ADD COLUMN expires_at_ms INTEGER;
ALTER TABLE api_keys ADD COLUMN budget_tokens_per_day INTEGER;
ALTER TABLE api_keys ADD COLUMN budget_tokens_per_month INTEGER;
ALTER TABLE api_keys ADD COLUMN budget_usd_per_day REAL;
ALTER TABLE api_keys ADD COLUMN budget_usd_per_month REAL;
CREATE INDEX usage_records_by_key ON usage_records (api_key_id, at_ms);
"#,
    // 5 (issue 13, fleet-wide limits): the shared per-minute counters gateways lease slices
    // of, and each gateway's concurrency holds with their expiry.
    r#"
CREATE TABLE IF NOT EXISTS limit_windows (
    key_id           TEXT NOT NULL,
    pool             TEXT NOT NULL,
    window_start_ms  INTEGER NOT NULL,
    used             INTEGER NOT NULL,
    last_grant       INTEGER NOT NULL,
    PRIMARY KEY (key_id, pool, window_start_ms)
) STRICT;
CREATE TABLE IF NOT EXISTS limit_holds (
    gateway_id     TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    pool           TEXT NOT NULL,
    held           INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (key_id, pool, gateway_id)
) STRICT;
"#,
    // 6 (issue 13, redirects): the federation's secret, one row, the MAC key of redirect
    // tickets.
    r#"
CREATE TABLE IF NOT EXISTS federation_secret (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    secret         BLOB NOT NULL,
    created_at_ms  INTEGER NOT NULL
) STRICT;
"#,
    // 7 (issue 13, session resume): the sessions directory (a session's id is a random u64,
    // stored bit for bit as a signed integer).
    r#"
CREATE TABLE IF NOT EXISTS game_session_dir (
    session_id           INTEGER PRIMARY KEY,
    key_id               TEXT NOT NULL,
    node_id              TEXT NOT NULL,
    gateway_id           TEXT NOT NULL,
    game                 TEXT NOT NULL,
    width                INTEGER NOT NULL,
    height               INTEGER NOT NULL,
    fps                  INTEGER NOT NULL,
    bitrate_kbps         INTEGER NOT NULL,
    resume_token_sha256  TEXT NOT NULL,
    updated_at_ms        INTEGER NOT NULL
) STRICT;
"#,
    // 8 (issue 13): the federation's gateway directory (one row per gateway, with its lease)
    // and node directory (one row per live node, owned by the gateway holding its connection).
    // Self-contained (IF NOT EXISTS) so that it applies whatever its final number.
    r#"
CREATE TABLE IF NOT EXISTS gateways (
    id               TEXT PRIMARY KEY,
    region           TEXT NOT NULL,
    lat              REAL NOT NULL,
    lon              REAL NOT NULL,
    quic_address     TEXT NOT NULL,
    http_url         TEXT NOT NULL,
    cert_sha256      TEXT NOT NULL,
    version          TEXT NOT NULL,
    started_at_ms    INTEGER NOT NULL,
    heartbeat_at_ms  INTEGER NOT NULL,
    expires_at_ms    INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS node_directory (
    node_id          TEXT PRIMARY KEY,
    operator_id      TEXT NOT NULL,
    gateway_id       TEXT NOT NULL,
    country          TEXT,
    lat              REAL,
    lon              REAL,
    gpu_classes      TEXT NOT NULL,
    models           TEXT NOT NULL,
    games            TEXT NOT NULL,
    inference_slots  INTEGER NOT NULL,
    inference_free   INTEGER NOT NULL,
    game_slots       INTEGER NOT NULL,
    game_free        INTEGER NOT NULL,
    accepting        INTEGER NOT NULL,
    verification     TEXT NOT NULL,
    updated_at_ms    INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS node_directory_by_gateway ON node_directory (gateway_id);
"#,
    // 9 (issue 14): the checker's records: check records and each gateway's latest vote per
    // node, the GPUs each node reports, and each node's verification snapshot
    // (`sqlite/checker.rs`).
    checker::MIGRATION,
    // 10 (issue 15): the session's video codec in the sessions directory.
    r#"
ALTER TABLE game_session_dir ADD COLUMN codec TEXT NOT NULL DEFAULT 'h264';
"#,
    // 11 (issues 13 and 15): each node's video encoders in the node directory, a JSON array;
    // rows published before it read as `[]`, H.264 only (`sqlite/directory.rs`).
    r#"
ALTER TABLE node_directory ADD COLUMN encoders TEXT NOT NULL DEFAULT '[]';
"#,
    // 12 (issue 13): each node's model capabilities in the node directory, a JSON array of
    // bit sets by model; rows published before it read as `[]`, none declared.
    r#"
ALTER TABLE node_directory ADD COLUMN model_caps TEXT NOT NULL DEFAULT '[]';
"#,
    // 13 (issue 13): each node's ISO 3166-2 subdivision in the node directory; rows published
    // before it read as NULL, no subdivision (`sqlite/directory.rs`).
    r#"
ALTER TABLE node_directory ADD COLUMN subdivision TEXT;
"#,
];

/// A stored codec name; one this build does not know (a newer build wrote it) reads as H.264,
/// which every node encodes.
fn codec_of(name: &str) -> nearpath_protocol::message::VideoCodec {
    nearpath_protocol::message::VideoCodec::from_name(name).unwrap_or_default()
}

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

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

/// Counters of the usage writer, for metrics: `records / batches` is the mean batch size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed by the writer.
    pub batches: u64,
    /// Usage records committed by the writer.
    pub records: u64,
    /// Usage records answered with an error, plus failed health probes.
    pub failed: u64,
}

/// How often the writer probes a ledger that failed to commit, to notice that it recovered
/// while the gateway refuses the work that would otherwise have told it.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

struct WriterCounters {
    batches: AtomicU64,
    records: AtomicU64,
    failed: AtomicU64,
    /// Transactions attempted, committed or not (for tests of the retry policy).
    attempts: AtomicU64,
    /// Cleared by a commit that failed for a reason not about one record, set by the next
    /// commit (or probe) that succeeds.
    healthy: AtomicBool,
}

impl Default for WriterCounters {
    fn default() -> Self {
        WriterCounters {
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        }
    }
}

impl WriterCounters {
    fn committed(&self, records: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(records as u64, Ordering::Relaxed);
        self.healthy.store(true, Ordering::Release);
    }

    fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    fn unhealthy(&self, err: &StoreError) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::error!(error = %err, "usage ledger cannot commit; new work is refused until it can");
        }
    }
}

/// A validated usage record, converted to what SQLite stores, waiting for the writer (the
/// PostgreSQL store validates with it too).
pub(super) struct UsageRow {
    pub(super) at_ms: i64,
    pub(super) kind: &'static str,
    pub(super) request_id: String,
    pub(super) tenant: String,
    pub(super) api_key_id: String,
    pub(super) node_id: String,
    pub(super) operator_id: String,
    pub(super) workload: String,
    pub(super) outcome: String,
    pub(super) prompt_tokens: i64,
    pub(super) completion_tokens: i64,
    pub(super) ttft_ms: Option<f64>,
    pub(super) duration_ms: f64,
    pub(super) gpu_seconds: f64,
    pub(super) frames: i64,
    pub(super) bytes: i64,
    pub(super) node_prompt_tokens: Option<i64>,
    pub(super) node_completion_tokens: Option<i64>,
}

impl UsageRow {
    pub(super) fn new(r: UsageRecord) -> Result<Self, StoreError> {
        check_id("request_id", &r.request_id, true)?;
        check_id("tenant", &r.tenant, true)?;
        check_id("api_key_id", &r.api_key_id, true)?;
        check_id("node_id", &r.node_id, true)?;
        check_id("operator_id", &r.operator_id, true)?;
        check_text("workload", &r.workload)?;
        check_text("outcome", &r.outcome)?;
        if let Some(ttft) = r.ttft_ms {
            check_measure("ttft_ms", ttft)?;
        }
        check_measure("duration_ms", r.duration_ms)?;
        check_measure("gpu_seconds", r.gpu_seconds)?;
        Ok(UsageRow {
            at_ms: to_i64("at_ms", r.at_ms)?,
            kind: r.kind.as_str(),
            prompt_tokens: to_i64("prompt_tokens", r.prompt_tokens)?,
            completion_tokens: to_i64("completion_tokens", r.completion_tokens)?,
            frames: to_i64("frames", r.frames)?,
            bytes: to_i64("bytes", r.bytes)?,
            node_prompt_tokens: r
                .node_prompt_tokens
                .map(|v| to_i64("node_prompt_tokens", v))
                .transpose()?,
            node_completion_tokens: r
                .node_completion_tokens
                .map(|v| to_i64("node_completion_tokens", v))
                .transpose()?,
            ttft_ms: r.ttft_ms,
            duration_ms: r.duration_ms,
            gpu_seconds: r.gpu_seconds,
            request_id: r.request_id,
            tenant: r.tenant,
            api_key_id: r.api_key_id,
            node_id: r.node_id,
            operator_id: r.operator_id,
            workload: r.workload,
            outcome: r.outcome,
        })
    }
}

/// One `append_usage` (or `update_usage`) call waiting for its batch to commit; `reply` is its
/// one-shot answer.
struct Job {
    row: UsageRow,
    /// The record to replace, for `update_usage`; `None` appends.
    replace: Option<i64>,
    reply: Reply,
}

/// Where the writer sends a job's outcome once its batch has committed (or failed).
enum Reply {
    /// A caller blocked in [`SqliteStore::write_usage`].
    Wait(mpsc::SyncSender<Result<i64, StoreError>>),
    /// A caller that did not wait ([`Store::append_usage_then`]): the writer runs this itself.
    Then(UsageThen),
}

impl Reply {
    fn send(self, result: Result<i64, StoreError>) {
        match self {
            // A caller that has gone away no longer needs its answer.
            Reply::Wait(tx) => {
                let _ = tx.send(result);
            }
            Reply::Then(then) => then(result),
        }
    }
}

/// The writer's connection: its own for a file, the main one for an in-memory database (a second
/// connection to `:memory:` would open a different, empty database).
enum WriterConnKind {
    Own(Connection),
    Shared(Arc<Mutex<Connection>>),
}

struct WriterConn {
    kind: WriterConnKind,
    gate: Arc<Mutex<()>>,
}

impl WriterConn {
    /// Runs `f` holding the write gate (see [`SqliteStore`]) and the connection.
    fn with<R>(&mut self, f: impl FnOnce(&mut Connection) -> R) -> R {
        let _gate = lock(&self.gate);
        match &mut self.kind {
            WriterConnKind::Own(conn) => f(conn),
            WriterConnKind::Shared(shared) => f(&mut lock(shared)),
        }
    }
}

/// The main connection locked for a write: the write gate first, then the connection (the order
/// the writer uses too, so the two can never deadlock).
struct WriteConn<'a> {
    conn: MutexGuard<'a, Connection>,
    _gate: MutexGuard<'a, ()>,
}

impl std::ops::Deref for WriteConn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteConn<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// Locks a mutex, ignoring poisoning: a panic while a connection's lock was held cannot leave it
/// inside a transaction, because rusqlite's `Transaction` rolls back when dropped during
/// unwinding, so the connection is still fit for use (and the gate guards no data at all).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a cached query and collects every row, naming `what` in any error.
fn query_all<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).op(what)?;
    let rows = stmt.query_map(params, map).op(what)?;
    rows.collect::<Result<_, _>>().op(what)
}

/// Attaches the operation name to an SQLite error.
trait OpExt<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T> OpExt<T> for rusqlite::Result<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sqlite { op, source })
    }
}

/// Attaches the operation name and the database path to an SQLite error raised while opening.
fn open_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |source| StoreError::Open {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl FromSql for KycStatus {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value.as_str()?.parse().map_err(FromSqlError::other)
    }
}

impl FromSql for UsageKind {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value.as_str()?.parse().map_err(FromSqlError::other)
    }
}

/// Reads a non-negative integer column as `u64`.
fn get_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

/// Converts a query bound (a time or a limit) to SQLite's integer, saturating: nothing stored
/// lies beyond `i64::MAX`, so the saturated bound selects the same rows.
fn saturating_i64<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

fn operator_from_row(r: &Row<'_>) -> rusqlite::Result<Operator> {
    Ok(Operator {
        id: r.get(0)?,
        name: r.get(1)?,
        kyc_status: r.get(2)?,
        created_at_ms: get_u64(r, 3)?,
        updated_at_ms: get_u64(r, 4)?,
    })
}

/// Reads a token from the columns of [`TOKEN_COLS`] starting at `at`.
fn token_from_row(r: &Row<'_>, at: usize) -> rusqlite::Result<EnrolmentToken> {
    Ok(EnrolmentToken {
        id: r.get(at)?,
        operator_id: r.get(at + 1)?,
        created_at_ms: get_u64(r, at + 2)?,
        prefix: r.get(at + 3)?,
        revoked: r.get(at + 4)?,
    })
}

fn api_key_from_row(r: &Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: r.get(0)?,
        tenant: r.get(1)?,
        requests_per_minute: r.get(2)?,
        tokens_per_minute: r.get(3)?,
        created_at_ms: get_u64(r, 4)?,
        revoked: r.get(5)?,
        prefix: r.get(6)?,
        caps: KeyCaps {
            max_concurrent_streams: r.get(7)?,
            max_concurrent_sessions: r.get(8)?,
            session_starts_per_minute: r.get(9)?,
        },
        policy: KeyPolicy {
            allowed_models: match r.get::<_, Option<String>>(10)? {
                None => Vec::new(),
                Some(text) => serde_json::from_str(&text).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        10,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?,
            },
            expires_at_ms: opt_u64(r, 11)?,
            budget_tokens_per_day: opt_u64(r, 12)?,
            budget_tokens_per_month: opt_u64(r, 13)?,
            budget_usd_per_day: r.get(14)?,
            budget_usd_per_month: r.get(15)?,
        },
    })
}

/// A nullable counter column (negative values, which the store never writes, read as 0).
fn opt_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    Ok(row
        .get::<_, Option<i64>>(idx)?
        .map(|v| u64::try_from(v).unwrap_or(0)))
}

fn sla_from_row(r: &Row<'_>) -> rusqlite::Result<SlaRecord> {
    Ok(SlaRecord {
        node_id: r.get(0)?,
        operator_id: r.get(1)?,
        first_registered_at_ms: get_u64(r, 2)?,
        last_seen_at_ms: get_u64(r, 3)?,
        registered_ms: get_u64(r, 4)?,
        registrations: get_u64(r, 5)?,
        sessions_served: get_u64(r, 6)?,
        sessions_failed: get_u64(r, 7)?,
        heartbeat_misses: get_u64(r, 8)?,
        penalty_events: get_u64(r, 9)?,
        last_rtt_ms: r.get(10)?,
    })
}

fn gpu_model_from_row(r: &Row<'_>) -> rusqlite::Result<GpuModelRecord> {
    Ok(GpuModelRecord {
        model_key: r.get(0)?,
        example: r.get(1)?,
        class: r.get(2)?,
        first_seen_at_ms: get_u64(r, 3)?,
        last_seen_at_ms: get_u64(r, 4)?,
        seen: get_u64(r, 5)?,
        classified_at_ms: r
            .get::<_, Option<i64>>(6)?
            .map(|v| u64::try_from(v).unwrap_or(0)),
    })
}

fn penalty_from_row(r: &Row<'_>) -> rusqlite::Result<PenaltyEvent> {
    Ok(PenaltyEvent {
        id: r.get(0)?,
        node_id: r.get(1)?,
        operator_id: r.get(2)?,
        at_ms: get_u64(r, 3)?,
        kind: r.get(4)?,
        active_sessions: r.get(5)?,
        detail: r.get(6)?,
    })
}

fn usage_from_row(r: &Row<'_>) -> rusqlite::Result<UsageRecord> {
    Ok(UsageRecord {
        id: Some(r.get(0)?),
        at_ms: get_u64(r, 1)?,
        kind: r.get(2)?,
        request_id: r.get(3)?,
        tenant: r.get(4)?,
        api_key_id: r.get(5)?,
        node_id: r.get(6)?,
        operator_id: r.get(7)?,
        workload: r.get(8)?,
        outcome: r.get(9)?,
        prompt_tokens: get_u64(r, 10)?,
        completion_tokens: get_u64(r, 11)?,
        ttft_ms: r.get(12)?,
        duration_ms: r.get(13)?,
        gpu_seconds: r.get(14)?,
        frames: get_u64(r, 15)?,
        bytes: get_u64(r, 16)?,
        node_prompt_tokens: r
            .get::<_, Option<i64>>(17)?
            .map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(17, v)))
            .transpose()?,
        node_completion_tokens: r
            .get::<_, Option<i64>>(18)?
            .map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(18, v)))
            .transpose()?,
    })
}

fn totals_from_row(r: &Row<'_>) -> rusqlite::Result<UsageTotals> {
    Ok(UsageTotals {
        key: r.get(0)?,
        requests: get_u64(r, 1)?,
        prompt_tokens: get_u64(r, 2)?,
        completion_tokens: get_u64(r, 3)?,
        gpu_seconds: r.get(4)?,
        frames: get_u64(r, 5)?,
        bytes: get_u64(r, 6)?,
        errors: get_u64(r, 7)?,
    })
}

/// Per-connection settings. `synchronous` and `foreign_keys` are not stored in the file, so every
/// connection sets them.
fn configure(conn: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

/// Checks that the database is empty or ours and not from a newer build, then brings its schema
/// up to [`SCHEMA_VERSION`]. Runs in one IMMEDIATE transaction, so two gateways starting on the
/// same file cannot both migrate it, and a failed migration leaves it untouched.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_err(path, "begin migration"))?;
    let application_id: i32 = tx
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(open_err(path, "read application_id"))?;
    let found: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(open_err(path, "read user_version"))?;
    let tables: i64 = tx
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .map_err(open_err(path, "list tables"))?;
    let fresh = application_id == 0 && tables == 0;
    if application_id != APPLICATION_ID && !fresh {
        return Err(StoreError::ForeignDatabase {
            path: path.to_path_buf(),
            application_id,
            tables: u64::try_from(tables).unwrap_or(0),
        });
    }
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let Ok(first) = usize::try_from(found) else {
        return Err(StoreError::Unsupported {
            path: path.to_path_buf(),
            message: format!("negative schema version {found}"),
        });
    };
    if first == MIGRATIONS.len() {
        // Nothing to do; dropping the transaction rolls back its (read-only) work.
        return Ok(());
    }
    for sql in &MIGRATIONS[first..] {
        tx.execute_batch(sql)
            .map_err(open_err(path, "apply schema migration"))?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(open_err(path, "set application_id"))?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(open_err(path, "set user_version"))?;
    tx.commit().map_err(open_err(path, "commit migration"))
}

/// The group-commit loop: blocks for the first job, takes every job already queued behind it,
/// commits them together and answers each caller. Ends when the store drops its sender, after
/// committing everything queued before that.
///
/// While the ledger is unhealthy the loop also wakes every [`PROBE_INTERVAL`] without a job and
/// rewrites the one row of `ledger_probe`: the gateway refuses new work meanwhile, so without
/// the probe nothing would ever tell it that the disk has room again.
fn writer_loop(mut conn: WriterConn, jobs: mpsc::Receiver<Job>, counters: &WriterCounters) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = if counters.healthy.load(Ordering::Acquire) {
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        } else {
            match jobs.recv_timeout(PROBE_INTERVAL) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    probe(&mut conn, counters);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit_jobs(&mut conn, &mut batch, counters);
    }
}

/// One small committed write: proves that the ledger can commit again.
fn probe(conn: &mut WriterConn, counters: &WriterCounters) {
    counters.attempts.fetch_add(1, Ordering::Relaxed);
    let result = conn.with(|c| {
        let at = saturating_i64(crate::clock::system_unix_ms());
        let tx = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin ledger probe")?;
        tx.execute(
            "INSERT INTO ledger_probe (id, at_ms) VALUES (1, ?1) \
             ON CONFLICT (id) DO UPDATE SET at_ms = excluded.at_ms",
            [at],
        )
        .op("write ledger probe")?;
        tx.commit().op("commit ledger probe")
    });
    match result {
        Ok(()) => {
            counters.healthy.store(true, Ordering::Release);
            tracing::info!("usage ledger commits again");
        }
        Err(e) => {
            counters.failed();
            tracing::debug!(error = %e, "usage ledger probe failed");
        }
    }
}

/// Commits `batch` in one transaction and answers every job in it, leaving `batch` empty.
fn commit_jobs(conn: &mut WriterConn, batch: &mut Vec<Job>, counters: &WriterCounters) {
    counters.attempts.fetch_add(1, Ordering::Relaxed);
    match conn.with(|c| insert_usage_batch(c, batch)) {
        Ok(ids) => {
            counters.committed(batch.len());
            for (job, id) in batch.drain(..).zip(ids) {
                job.reply.send(Ok(id));
            }
        }
        Err(err) if batch.len() == 1 || !is_record_specific(&err) => {
            // The whole batch was rolled back for a reason that is not about any one record (a
            // lock held elsewhere past the busy timeout, a full disk, an I/O error): retrying
            // record by record would fail the same way, once per record, so every caller gets
            // the error now.
            if !is_record_specific(&err) {
                counters.unhealthy(&err);
            }
            let last = batch.pop();
            for job in batch.drain(..) {
                counters.failed();
                job.reply.send(Err(same_failure(&err)));
            }
            if let Some(job) = last {
                counters.failed();
                job.reply.send(Err(err));
            }
        }
        Err(_) => {
            // One record made the batch fail (it was rolled back). Retry each alone so that the
            // bad record costs only its own caller an error.
            for job in batch.drain(..) {
                counters.attempts.fetch_add(1, Ordering::Relaxed);
                // `insert_usage_batch` returns one id per job, so `first` is always present.
                let result = conn
                    .with(|c| insert_usage_batch(c, std::slice::from_ref(&job)))
                    .and_then(|ids| ids.first().copied().ok_or(StoreError::Closed));
                match &result {
                    Ok(_) => counters.committed(1),
                    Err(e) => {
                        counters.failed();
                        if !is_record_specific(e) {
                            counters.unhealthy(e);
                        }
                    }
                }
                job.reply.send(result);
            }
        }
    }
}

/// Whether a failed batch insert may be due to one particular record, so that retrying the
/// records one by one can save the others.
fn is_record_specific(err: &StoreError) -> bool {
    match err {
        StoreError::Sqlite {
            source: rusqlite::Error::SqliteFailure(e, _),
            ..
        } => matches!(
            e.code,
            rusqlite::ErrorCode::ConstraintViolation
                | rusqlite::ErrorCode::TypeMismatch
                | rusqlite::ErrorCode::TooBig
                | rusqlite::ErrorCode::ParameterOutOfRange
        ),
        // Conversion and binding failures are about a value; anything else is unexpected, and
        // a retry one by one is the cautious answer.
        _ => true,
    }
}

/// An equivalent error for another caller of the same failed batch (`rusqlite::Error` cannot be
/// cloned, but the engine failures that reach this point are plain codes and a message).
fn same_failure(err: &StoreError) -> StoreError {
    match err {
        StoreError::Sqlite {
            op,
            source: rusqlite::Error::SqliteFailure(e, msg),
        } => StoreError::Sqlite {
            op,
            source: rusqlite::Error::SqliteFailure(*e, msg.clone()),
        },
        other => StoreError::Sqlite {
            op: "append usage batch",
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                Some(other.to_string()),
            ),
        },
    }
}

/// Inserts (or, for `update_usage` jobs, rewrites) the jobs' rows in one IMMEDIATE transaction
/// and commits; returns their ids in order.
fn insert_usage_batch(conn: &mut Connection, jobs: &[Job]) -> Result<Vec<i64>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .op("begin usage batch")?;
    let mut ids = Vec::with_capacity(jobs.len());
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO usage_records (at_ms, kind, request_id, tenant, api_key_id, node_id, \
                 operator_id, workload, outcome, prompt_tokens, completion_tokens, ttft_ms, \
                 duration_ms, gpu_seconds, frames, bytes, node_prompt_tokens, \
                 node_completion_tokens) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, \
                 ?17, ?18)",
            )
            .op("prepare usage insert")?;
        let mut update = tx
            .prepare_cached(
                "UPDATE usage_records SET at_ms = ?1, kind = ?2, request_id = ?3, tenant = ?4, \
                 api_key_id = ?5, node_id = ?6, operator_id = ?7, workload = ?8, outcome = ?9, \
                 prompt_tokens = ?10, completion_tokens = ?11, ttft_ms = ?12, duration_ms = ?13, \
                 gpu_seconds = ?14, frames = ?15, bytes = ?16, node_prompt_tokens = ?17, \
                 node_completion_tokens = ?18 WHERE id = ?19",
            )
            .op("prepare usage update")?;
        for job in jobs {
            let r = &job.row;
            // One column list for both statements; the UPDATE takes the row id last.
            let cols: [&dyn rusqlite::ToSql; 18] = [
                &r.at_ms,
                &r.kind,
                &r.request_id,
                &r.tenant,
                &r.api_key_id,
                &r.node_id,
                &r.operator_id,
                &r.workload,
                &r.outcome,
                &r.prompt_tokens,
                &r.completion_tokens,
                &r.ttft_ms,
                &r.duration_ms,
                &r.gpu_seconds,
                &r.frames,
                &r.bytes,
                &r.node_prompt_tokens,
                &r.node_completion_tokens,
            ];
            if let Some(id) = job.replace {
                let changed = update
                    .execute(rusqlite::params_from_iter(
                        cols.iter().copied().chain([&id as &dyn rusqlite::ToSql]),
                    ))
                    .op("update usage record")?;
                if changed == 0 {
                    return Err(StoreError::NotFound {
                        kind: "usage record",
                        id: id.to_string(),
                    });
                }
                ids.push(id);
                continue;
            }
            let id = stmt
                .insert(rusqlite::params_from_iter(cols))
                .op("insert usage record")?;
            ids.push(id);
        }
    }
    tx.commit().op("commit usage batch")?;
    Ok(ids)
}

/// The SQLite implementation of [`Store`]. See the module documentation for its design.
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// Serialises this process's writers (the main connection and the usage writer) before they
    /// ask SQLite for its write lock. Without it they would contend inside SQLite, whose busy
    /// handler polls with sleeps of up to 100 ms and lets one side starve the other; with it,
    /// SQLite's busy timeout only comes into play against other processes.
    gate: Arc<Mutex<()>>,
    /// `None` only while dropping; dropping the sender tells the writer to finish.
    writer: Option<mpsc::Sender<Job>>,
    writer_thread: Option<JoinHandle<()>>,
    counters: Arc<WriterCounters>,
    location: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.location)
            .field("writer", &self.writer_stats())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, migrating its schema. The parent
    /// directory must exist. Fails, naming the path, if the file is not an SQLite database, is
    /// another application's database, or has a schema newer than this build's.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_busy_timeout(path, DEFAULT_BUSY_TIMEOUT)
    }

    /// [`SqliteStore::open`] with a chosen busy timeout: how long a call waits for a lock held by
    /// another connection (or process) before failing with a retryable error.
    pub fn open_with_busy_timeout(
        path: impl AsRef<Path>,
        busy_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                return Err(StoreError::MissingDirectory {
                    path: path.to_path_buf(),
                    dir: dir.to_path_buf(),
                });
            }
        }
        // No SQLITE_OPEN_URI: the configured path is a file name, never a `file:` URI with options.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags).map_err(open_err(path, "open"))?;
        configure(&conn, busy_timeout).map_err(open_err(path, "configure"))?;
        migrate(&mut conn, path)?;
        // WAL is switched on only once the file is known to be ours (it is a persistent change to
        // the file). It lets readers proceed while the writer commits.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(open_err(path, "enable WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unsupported {
                path: path.to_path_buf(),
                message: format!("cannot use write-ahead logging (journal mode is {mode})"),
            });
        }
        let writer =
            Connection::open_with_flags(path, flags).map_err(open_err(path, "open writer"))?;
        configure(&writer, busy_timeout).map_err(open_err(path, "configure writer"))?;
        Self::start(conn, Some(writer), path.to_path_buf())
    }

    /// A private in-memory database, for tests. Nothing survives dropping the store.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let path = Path::new(":memory:");
        let mut conn = Connection::open_in_memory().map_err(open_err(path, "open"))?;
        configure(&conn, DEFAULT_BUSY_TIMEOUT).map_err(open_err(path, "configure"))?;
        migrate(&mut conn, path)?;
        Self::start(conn, None, path.to_path_buf())
    }

    fn start(
        conn: Connection,
        writer: Option<Connection>,
        location: PathBuf,
    ) -> Result<Self, StoreError> {
        let conn = Arc::new(Mutex::new(conn));
        let gate = Arc::new(Mutex::new(()));
        let writer_conn = WriterConn {
            kind: match writer {
                Some(own) => WriterConnKind::Own(own),
                None => WriterConnKind::Shared(Arc::clone(&conn)),
            },
            gate: Arc::clone(&gate),
        };
        let counters = Arc::new(WriterCounters::default());
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn({
                let counters = Arc::clone(&counters);
                move || writer_loop(writer_conn, receiver, &counters)
            })
            .map_err(|source| StoreError::Io {
                op: "start usage writer thread",
                source,
            })?;
        Ok(SqliteStore {
            conn,
            gate,
            writer: Some(sender),
            writer_thread: Some(thread),
            counters,
            location,
        })
    }

    /// The database file, or `:memory:`.
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// What the usage writer has committed so far.
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            records: self.counters.records.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }

    /// Hands a usage write to the writer thread and waits for its commit.
    fn write_usage(&self, record: UsageRecord, replace: Option<i64>) -> Result<i64, StoreError> {
        let row = UsageRow::new(record)?;
        let writer = self.writer.as_ref().ok_or(StoreError::Closed)?;
        let (reply, answer) = mpsc::sync_channel(1);
        writer
            .send(Job {
                row,
                replace,
                reply: Reply::Wait(reply),
            })
            .map_err(|_| StoreError::Closed)?;
        // The writer answers only after the batch holding this record has committed (or failed);
        // if it died instead, the reply sender is dropped and this reports the store closed.
        answer.recv().map_err(|_| StoreError::Closed)?
    }

    /// The main connection, for reads.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    /// The main connection, for writes.
    fn write_conn(&self) -> WriteConn<'_> {
        let gate = lock(&self.gate);
        WriteConn {
            conn: lock(&self.conn),
            _gate: gate,
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer commit what is queued and exit; joining it means a
        // store that has been dropped has no write still in flight.
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

fn operator_exists(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    conn.query_row("SELECT 1 FROM operators WHERE id = ?1", [id], |_| Ok(()))
        .optional()
        .op("look up operator")
        .map(|found| found.is_some())
}

pub(super) fn check_secret(secret: &str) -> Result<(), StoreError> {
    if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
        return Err(StoreError::Invalid {
            field: "secret",
            message: format!("must be 1 to {MAX_SECRET_BYTES} bytes"),
        });
    }
    if secret.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(StoreError::Invalid {
            field: "secret",
            message: "must not contain whitespace or control characters".into(),
        });
    }
    Ok(())
}

impl Store for SqliteStore {
    fn create_operator(&self, name: &str, kyc: KycStatus) -> Result<Operator, StoreError> {
        let name = check_name("name", name, MAX_NAME_CHARS)?;
        let now = crate::clock::system_unix_ms();
        let op = Operator {
            id: new_id("op_"),
            name: name.to_owned(),
            kyc_status: kyc,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.write_conn()
            .execute(
                "INSERT INTO operators (id, name, kyc_status, created_at_ms, updated_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?4)",
                params![op.id, op.name, kyc.as_str(), to_i64("created_at_ms", now)?],
            )
            .op("insert operator")?;
        Ok(op)
    }

    fn get_operator(&self, id: &str) -> Result<Option<Operator>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {OPERATOR_COLS} FROM operators WHERE id = ?1"),
                [id],
                operator_from_row,
            )
            .optional()
            .op("get operator")
    }

    fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        query_all(
            &self.conn(),
            &format!("SELECT {OPERATOR_COLS} FROM operators ORDER BY rowid"),
            [],
            operator_from_row,
            "list operators",
        )
    }

    fn set_operator_kyc(&self, id: &str, status: KycStatus) -> Result<Operator, StoreError> {
        let now = to_i64("updated_at_ms", crate::clock::system_unix_ms())?;
        self.write_conn()
            .query_row(
                &format!(
                    "UPDATE operators SET kyc_status = ?2, updated_at_ms = max(?3, created_at_ms) \
                     WHERE id = ?1 RETURNING {OPERATOR_COLS}"
                ),
                params![id, status.as_str(), now],
                operator_from_row,
            )
            .optional()
            .op("set operator kyc")?
            .ok_or_else(|| StoreError::NotFound {
                kind: "operator",
                id: id.to_owned(),
            })
    }

    fn create_enrolment_token(
        &self,
        operator_id: &str,
    ) -> Result<(EnrolmentToken, String), StoreError> {
        let secret = new_secret(ENROLMENT_TOKEN_PREFIX);
        let now = crate::clock::system_unix_ms();
        let token = EnrolmentToken {
            id: new_id("tok_"),
            operator_id: operator_id.to_owned(),
            created_at_ms: now,
            prefix: secret_display_prefix(&secret),
            revoked: false,
        };
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin create enrolment token")?;
        if !operator_exists(&tx, operator_id)? {
            return Err(StoreError::NotFound {
                kind: "operator",
                id: operator_id.to_owned(),
            });
        }
        tx.execute(
            "INSERT INTO enrolment_tokens (id, operator_id, secret_hash, prefix, created_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                token.id,
                token.operator_id,
                hash_secret(&secret),
                token.prefix,
                to_i64("created_at_ms", now)?
            ],
        )
        .op("insert enrolment token")?;
        tx.commit().op("commit enrolment token")?;
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
        // The lookup is by the digest through a unique index, and no secret is ever compared:
        // timing can reveal at most how far a guessed *digest* matches a stored one, which says
        // nothing usable about any secret, so a constant-time comparison would add nothing.
        self.conn()
            .query_row(
                "SELECT o.id, o.name, o.kyc_status, o.created_at_ms, o.updated_at_ms, \
                 t.id, t.operator_id, t.created_at_ms, t.prefix, t.revoked_at_ms IS NOT NULL \
                 FROM enrolment_tokens t JOIN operators o ON o.id = t.operator_id \
                 WHERE t.secret_hash = ?1 AND t.revoked_at_ms IS NULL",
                [hash_secret(secret)],
                |r| Ok((operator_from_row(r)?, token_from_row(r, 5)?)),
            )
            .optional()
            .op("authenticate enrolment token")
    }

    fn revoke_enrolment_token(&self, id: &str) -> Result<(), StoreError> {
        let now = to_i64("revoked_at_ms", crate::clock::system_unix_ms())?;
        let changed = self
            .write_conn()
            .execute(
                "UPDATE enrolment_tokens SET revoked_at_ms = coalesce(revoked_at_ms, ?2) \
                 WHERE id = ?1",
                params![id, now],
            )
            .op("revoke enrolment token")?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                kind: "enrolment_token",
                id: id.to_owned(),
            });
        }
        Ok(())
    }

    fn list_enrolment_tokens(&self, operator_id: &str) -> Result<Vec<EnrolmentToken>, StoreError> {
        let mut conn = self.conn();
        // One read transaction, so "operator exists" and its tokens come from the same snapshot.
        let tx = conn.transaction().op("begin list enrolment tokens")?;
        if !operator_exists(&tx, operator_id)? {
            return Err(StoreError::NotFound {
                kind: "operator",
                id: operator_id.to_owned(),
            });
        }
        query_all(
            &tx,
            &format!(
                "SELECT {TOKEN_COLS} FROM enrolment_tokens WHERE operator_id = ?1 ORDER BY rowid"
            ),
            [operator_id],
            |r| token_from_row(r, 0),
            "list enrolment tokens",
        )
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
        let hash = hash_secret(secret);
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin insert api key")?;
        let existing = tx
            .query_row(
                &format!("SELECT {API_KEY_COLS} FROM api_keys WHERE secret_hash = ?1"),
                [&hash],
                api_key_from_row,
            )
            .optional()
            .op("look up api key")?;
        if let Some(existing) = existing {
            return Ok(existing);
        }
        let now = crate::clock::system_unix_ms();
        let key = ApiKey {
            id: new_id("key_"),
            tenant: tenant.to_owned(),
            requests_per_minute,
            tokens_per_minute,
            created_at_ms: now,
            revoked: false,
            prefix: secret_display_prefix(secret),
            caps: KeyCaps::default(),
            policy: KeyPolicy::default(),
        };
        tx.execute(
            "INSERT INTO api_keys (id, tenant, secret_hash, prefix, requests_per_minute, \
             tokens_per_minute, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                key.id,
                key.tenant,
                hash,
                key.prefix,
                requests_per_minute,
                tokens_per_minute,
                to_i64("created_at_ms", now)?
            ],
        )
        .op("insert api key")?;
        tx.commit().op("commit api key")?;
        Ok(key)
    }

    fn authenticate_api_key(&self, secret: &str) -> Result<Option<ApiKey>, StoreError> {
        if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
            return Ok(None);
        }
        // As for enrolment tokens: an indexed lookup by digest, no secret comparison to time.
        self.conn()
            .query_row(
                &format!(
                    "SELECT {API_KEY_COLS} FROM api_keys \
                     WHERE secret_hash = ?1 AND revoked_at_ms IS NULL"
                ),
                [hash_secret(secret)],
                api_key_from_row,
            )
            .optional()
            .op("authenticate api key")
    }

    fn api_key_by_id(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        if !possible_id(id) {
            return Ok(None);
        }
        // The primary key's index: one row read, whatever the number of keys.
        self.conn()
            .query_row(
                &format!(
                    "SELECT {API_KEY_COLS} FROM api_keys WHERE id = ?1 AND revoked_at_ms IS NULL"
                ),
                [id],
                api_key_from_row,
            )
            .optional()
            .op("look up api key by id")
    }

    fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        query_all(
            &self.conn(),
            &format!("SELECT {API_KEY_COLS} FROM api_keys ORDER BY rowid"),
            [],
            api_key_from_row,
            "list api keys",
        )
    }

    fn revoke_api_key(&self, id: &str) -> Result<(), StoreError> {
        let now = to_i64("revoked_at_ms", crate::clock::system_unix_ms())?;
        let changed = self
            .write_conn()
            .execute(
                "UPDATE api_keys SET revoked_at_ms = coalesce(revoked_at_ms, ?2) WHERE id = ?1",
                params![id, now],
            )
            .op("revoke api key")?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                kind: "api_key",
                id: id.to_owned(),
            });
        }
        Ok(())
    }

    fn claim_node_id(
        &self,
        node_id: &str,
        operator_id: &str,
        at_ms: u64,
    ) -> Result<String, StoreError> {
        check_id("node_id", node_id, false)?;
        check_id("operator_id", operator_id, false)?;
        // The common case (a known node coming back) is a read; only a first claim writes.
        if let Some(owner) = self.node_owner(node_id)? {
            return Ok(owner);
        }
        let mut conn = self.write_conn();
        // One IMMEDIATE transaction: of two operators racing for a fresh id (here or on another
        // gateway sharing the file) exactly one inserts, and both read the same owner back.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin claim node id")?;
        tx.execute(
            "INSERT INTO node_ids (node_id, operator_id, claimed_at_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (node_id) DO NOTHING",
            params![node_id, operator_id, to_i64("at_ms", at_ms)?],
        )
        .op("claim node id")?;
        let owner: String = tx
            .query_row(
                "SELECT operator_id FROM node_ids WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .op("read node id owner")?;
        tx.commit().op("commit node id claim")?;
        Ok(owner)
    }

    fn node_owner(&self, node_id: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(
                "SELECT operator_id FROM node_ids WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .optional()
            .op("read node id owner")
    }

    fn update_api_key(&self, id: &str, update: ApiKeyUpdate) -> Result<ApiKey, StoreError> {
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
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin update api key")?;
        let mut key = tx
            .query_row(
                &format!("SELECT {API_KEY_COLS} FROM api_keys WHERE id = ?1"),
                [id],
                api_key_from_row,
            )
            .optional()
            .op("look up api key")?
            .ok_or_else(|| StoreError::NotFound {
                kind: "api_key",
                id: id.to_owned(),
            })?;
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
        tx.execute(
            "UPDATE api_keys SET requests_per_minute = ?2, tokens_per_minute = ?3, \
             max_concurrent_streams = ?4, max_concurrent_sessions = ?5, \
             session_starts_per_minute = ?6, allowed_models = ?7, expires_at_ms = ?8, \
             budget_tokens_per_day = ?9, budget_tokens_per_month = ?10, \
             budget_usd_per_day = ?11, budget_usd_per_month = ?12 WHERE id = ?1",
            params![
                id,
                key.requests_per_minute,
                key.tokens_per_minute,
                key.caps.max_concurrent_streams,
                key.caps.max_concurrent_sessions,
                key.caps.session_starts_per_minute,
                allowed,
                opt("expires_at_ms", p.expires_at_ms)?,
                opt("budget_tokens_per_day", p.budget_tokens_per_day)?,
                opt("budget_tokens_per_month", p.budget_tokens_per_month)?,
                p.budget_usd_per_day,
                p.budget_usd_per_month,
            ],
        )
        .op("update api key")?;
        tx.commit().op("commit api key update")?;
        Ok(key)
    }

    fn sla_apply(
        &self,
        node_id: &str,
        operator_id: &str,
        delta: SlaDelta,
    ) -> Result<SlaRecord, StoreError> {
        check_id("node_id", node_id, false)?;
        check_id("operator_id", operator_id, false)?;
        if let Some(rtt) = delta.last_rtt_ms {
            check_measure("last_rtt_ms", rtt)?;
        }
        self.write_conn()
            .query_row(
                &format!(
                    "INSERT INTO sla_records ({SLA_COLS}) \
                     VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9) \
                     ON CONFLICT (operator_id, node_id) DO UPDATE SET \
                       last_seen_at_ms = max(last_seen_at_ms, excluded.last_seen_at_ms), \
                       registered_ms = registered_ms + excluded.registered_ms, \
                       registrations = registrations + excluded.registrations, \
                       sessions_served = sessions_served + excluded.sessions_served, \
                       sessions_failed = sessions_failed + excluded.sessions_failed, \
                       heartbeat_misses = heartbeat_misses + excluded.heartbeat_misses, \
                       last_rtt_ms = coalesce(excluded.last_rtt_ms, last_rtt_ms) \
                     RETURNING {SLA_COLS}"
                ),
                params![
                    node_id,
                    operator_id,
                    to_i64("seen_at_ms", delta.seen_at_ms)?,
                    to_i64("registered_ms", delta.registered_ms)?,
                    to_i64("registrations", delta.registrations)?,
                    to_i64("sessions_served", delta.sessions_served)?,
                    to_i64("sessions_failed", delta.sessions_failed)?,
                    to_i64("heartbeat_misses", delta.heartbeat_misses)?,
                    delta.last_rtt_ms,
                ],
                sla_from_row,
            )
            .op("apply sla delta")
    }

    fn sla_get(&self, operator_id: &str, node_id: &str) -> Result<Option<SlaRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT {SLA_COLS} FROM sla_records WHERE operator_id = ?1 AND node_id = ?2"
                ),
                [operator_id, node_id],
                sla_from_row,
            )
            .optional()
            .op("get sla record")
    }

    fn sla_list(&self) -> Result<Vec<SlaRecord>, StoreError> {
        query_all(
            &self.conn(),
            &format!("SELECT {SLA_COLS} FROM sla_records ORDER BY node_id, operator_id"),
            [],
            sla_from_row,
            "list sla records",
        )
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
        let at = to_i64("at_ms", at_ms)?;
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin record penalty")?;
        let id: i64 = tx
            .query_row(
                "INSERT INTO penalty_events (node_id, operator_id, at_ms, kind, active_sessions, \
                 detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                params![node_id, operator_id, at, kind, active_sessions, detail],
                |r| r.get(0),
            )
            .op("insert penalty event")?;
        tx.execute(
            &format!(
                "INSERT INTO sla_records ({SLA_COLS}) VALUES (?1, ?2, ?3, ?3, 0, 0, 0, 0, 0, 1, NULL) \
                 ON CONFLICT (operator_id, node_id) DO UPDATE SET \
                   penalty_events = penalty_events + 1"
            ),
            params![node_id, operator_id, at],
        )
        .op("count penalty in sla record")?;
        tx.commit().op("commit penalty event")?;
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
        query_all(
            &self.conn(),
            &format!(
                "SELECT {PENALTY_COLS} FROM penalty_events \
                     WHERE ?1 IS NULL OR node_id = ?1 ORDER BY id DESC LIMIT ?2"
            ),
            params![node_id, saturating_i64(limit)],
            penalty_from_row,
            "list penalties",
        )
    }

    fn penalties_since(
        &self,
        operator_id: &str,
        node_id: &str,
        since_ms: u64,
    ) -> Result<u64, StoreError> {
        self.conn()
            .query_row(
                "SELECT count(*) FROM penalty_events \
                 WHERE operator_id = ?1 AND node_id = ?2 AND at_ms >= ?3",
                params![operator_id, node_id, saturating_i64(since_ms)],
                |r| get_u64(r, 0),
            )
            .op("count penalties")
    }

    fn gpu_model_class(&self, model_key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT class FROM gpu_models WHERE model_key = ?1",
                [model_key],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .op("read gpu model class")?
            .flatten())
    }

    fn note_unclassified_gpu_model(
        &self,
        model_key: &str,
        example: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        check_id("model_key", model_key, false)?;
        check_id("example", example, true)?;
        let at = to_i64("at_ms", at_ms)?;
        self.write_conn()
            .execute(
                "INSERT INTO gpu_models (model_key, example, class, first_seen_at_ms, \
                 last_seen_at_ms, seen, classified_at_ms) VALUES (?1, ?2, NULL, ?3, ?3, 1, NULL) \
                 ON CONFLICT (model_key) DO UPDATE SET \
                   last_seen_at_ms = max(last_seen_at_ms, excluded.last_seen_at_ms), \
                   seen = seen + 1",
                params![model_key, example, at],
            )
            .op("note gpu model")?;
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
        let at = to_i64("at_ms", at_ms)?;
        self.write_conn()
            .query_row(
                &format!(
                    "INSERT INTO gpu_models ({GPU_MODEL_COLS}) VALUES (?1, ?2, ?3, ?4, ?4, 0, ?4) \
                     ON CONFLICT (model_key) DO UPDATE SET \
                       class = excluded.class, classified_at_ms = excluded.classified_at_ms \
                     RETURNING {GPU_MODEL_COLS}"
                ),
                params![model_key, example, class, at],
                gpu_model_from_row,
            )
            .op("classify gpu model")
    }

    fn list_gpu_models(&self) -> Result<Vec<GpuModelRecord>, StoreError> {
        query_all(
            &self.conn(),
            &format!("SELECT {GPU_MODEL_COLS} FROM gpu_models ORDER BY model_key"),
            [],
            gpu_model_from_row,
            "list gpu models",
        )
    }

    fn append_usage(&self, record: UsageRecord) -> Result<i64, StoreError> {
        self.write_usage(record, None)
    }

    /// The writer thread runs `then` after the commit: the caller neither blocks nor needs a
    /// thread of its own to wait on (one per request in flight, before).
    fn append_usage_then(self: Arc<Self>, record: UsageRecord, then: UsageThen) {
        let row = match UsageRow::new(record) {
            Ok(row) => row,
            Err(e) => return then(Err(e)),
        };
        let Some(writer) = self.writer.as_ref() else {
            return then(Err(StoreError::Closed));
        };
        let job = Job {
            row,
            replace: None,
            reply: Reply::Then(then),
        };
        if let Err(mpsc::SendError(job)) = writer.send(job) {
            job.reply.send(Err(StoreError::Closed));
        }
    }

    fn update_usage(&self, id: i64, record: UsageRecord) -> Result<i64, StoreError> {
        self.write_usage(record, Some(id))
    }

    fn ledger_health(&self) -> LedgerHealth {
        LedgerHealth {
            healthy: self.counters.healthy.load(Ordering::Acquire),
            write_failures: self.counters.failed.load(Ordering::Relaxed),
        }
    }

    fn usage_summary(&self, since_ms: Option<u64>) -> Result<UsageSummary, StoreError> {
        let since = saturating_i64(since_ms.unwrap_or(0));
        let mut conn = self.conn();
        // One read transaction, so both groupings describe the same set of records.
        let tx = conn.transaction().op("begin usage summary")?;
        let totals = |group: &str, filter: &str| -> Result<Vec<UsageTotals>, StoreError> {
            query_all(
                &tx,
                &format!(
                    "SELECT {group}, count(*), sum(prompt_tokens), sum(completion_tokens), \
                     total(gpu_seconds), sum(frames), sum(bytes), \
                     sum(outcome NOT IN ('ok', 'cancelled', 'in_progress')) \
                     FROM usage_records WHERE at_ms >= ?1 {filter} \
                     GROUP BY {group} ORDER BY {group}"
                ),
                [since],
                totals_from_row,
                "summarise usage",
            )
        };
        Ok(UsageSummary {
            by_tenant: totals("tenant", "")?,
            by_node: totals("node_id", "AND node_id <> ''")?,
        })
    }

    fn list_usage(&self, limit: usize) -> Result<Vec<UsageRecord>, StoreError> {
        query_all(
            &self.conn(),
            &format!("SELECT {USAGE_COLS} FROM usage_records ORDER BY id DESC LIMIT ?1"),
            [saturating_i64(limit)],
            usage_from_row,
            "list usage",
        )
    }

    fn key_usage_by_day(
        &self,
        api_key_id: Option<&str>,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<KeyDayUsage>, StoreError> {
        // `?3 IS NULL OR api_key_id = ?3`: one statement for one key (the index on
        // (api_key_id, at_ms)) and for all (the index on at_ms).
        query_all(
            &self.conn(),
            "SELECT api_key_id, at_ms / 86400000 AS day, workload, count(*), \
             sum(prompt_tokens), sum(completion_tokens) FROM usage_records \
             WHERE kind = 'inference' AND at_ms >= ?1 AND at_ms < ?2 \
             AND (?3 IS NULL OR api_key_id = ?3) \
             GROUP BY api_key_id, day, workload ORDER BY api_key_id, day, workload",
            params![saturating_i64(from_ms), saturating_i64(to_ms), api_key_id],
            |r| {
                Ok(KeyDayUsage {
                    api_key_id: r.get(0)?,
                    day: r.get(1)?,
                    model: r.get(2)?,
                    requests: get_u64(r, 3)?,
                    prompt_tokens: get_u64(r, 4)?,
                    completion_tokens: get_u64(r, 5)?,
                })
            },
            "key usage by day",
        )
    }

    // ---- Fleet-wide limits (issue 13, item 4).

    fn lease_units(
        &self,
        key_id: &str,
        pool: &str,
        window_start_ms: u64,
        want: u64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        let (window, want, limit) = check_lease(key_id, pool, window_start_ms, want, limit)?;
        // One conditional upsert: the grant is computed from the row as it is when the write
        // takes it, so two gateways leasing at once can never be granted more than `limit`
        // together. SET expressions all read the old row, so `last_grant` is this call's grant.
        let granted: i64 = self
            .write_conn()
            .prepare_cached(
                "INSERT INTO limit_windows (key_id, pool, window_start_ms, used, last_grant) \
                 VALUES (?1, ?2, ?3, min(?4, ?5), min(?4, ?5)) \
                 ON CONFLICT (key_id, pool, window_start_ms) DO UPDATE SET \
                 used = used + min(?4, max(?5 - used, 0)), \
                 last_grant = min(?4, max(?5 - used, 0)) \
                 RETURNING last_grant",
            )
            .op("lease limit units")?
            .query_row(params![key_id, pool, window, want, limit], |r| r.get(0))
            .op("lease limit units")?;
        Ok(u64::try_from(granted).unwrap_or(0))
    }

    fn publish_holds(&self, gateway_id: &str, holds: &[FleetHold]) -> Result<(), StoreError> {
        check_holds(gateway_id, holds)?;
        let mut conn = self.write_conn();
        let tx = conn.transaction().op("begin publish holds")?;
        for h in holds {
            if h.held == 0 {
                tx.prepare_cached(
                    "DELETE FROM limit_holds WHERE key_id = ?1 AND pool = ?2 AND gateway_id = ?3",
                )
                .op("publish holds")?
                .execute(params![h.key_id, h.pool, gateway_id])
                .op("publish holds")?;
            } else {
                tx.prepare_cached(
                    "INSERT INTO limit_holds (gateway_id, key_id, pool, held, expires_at_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (key_id, pool, gateway_id) DO UPDATE SET \
                     held = excluded.held, expires_at_ms = excluded.expires_at_ms",
                )
                .op("publish holds")?
                .execute(params![
                    gateway_id,
                    h.key_id,
                    h.pool,
                    to_i64("held", h.held)?,
                    to_i64("expires_at_ms", h.expires_at_ms)?
                ])
                .op("publish holds")?;
            }
        }
        tx.commit().op("commit publish holds")
    }

    fn fleet_holds(&self, key_id: Option<&str>, now_ms: u64) -> Result<Vec<FleetHold>, StoreError> {
        if let Some(k) = key_id {
            check_id("key_id", k, false)?;
        }
        query_all(
            &self.conn(),
            "SELECT gateway_id, key_id, pool, held, expires_at_ms FROM limit_holds \
             WHERE expires_at_ms > ?1 AND (?2 IS NULL OR key_id = ?2) \
             ORDER BY key_id, pool, gateway_id",
            params![saturating_i64(now_ms), key_id],
            |r| {
                Ok(FleetHold {
                    gateway_id: r.get(0)?,
                    key_id: r.get(1)?,
                    pool: r.get(2)?,
                    held: get_u64(r, 3)?,
                    expires_at_ms: get_u64(r, 4)?,
                })
            },
            "list fleet holds",
        )
    }

    fn prune_limits(&self, before_window_ms: u64, now_ms: u64) -> Result<u64, StoreError> {
        let conn = self.write_conn();
        let windows = conn
            .execute(
                "DELETE FROM limit_windows WHERE window_start_ms < ?1",
                [saturating_i64(before_window_ms)],
            )
            .op("prune limit windows")?;
        let holds = conn
            .execute(
                "DELETE FROM limit_holds WHERE expires_at_ms <= ?1",
                [saturating_i64(now_ms)],
            )
            .op("prune limit holds")?;
        Ok((windows + holds) as u64)
    }
    fn federation_secret(&self, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        if candidate.len() < 32 {
            return Err(StoreError::Invalid {
                field: "candidate",
                message: "a federation secret must be at least 32 bytes".into(),
            });
        }
        if let Some(s) = self
            .conn()
            .query_row(
                "SELECT secret FROM federation_secret WHERE id = 1",
                [],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .op("read federation secret")?
        {
            return Ok(s);
        }
        let now = to_i64("created_at_ms", crate::clock::system_unix_ms())?;
        let conn = self.write_conn();
        conn.execute(
            "INSERT INTO federation_secret (id, secret, created_at_ms) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO NOTHING",
            params![candidate, now],
        )
        .op("create federation secret")?;
        conn.query_row(
            "SELECT secret FROM federation_secret WHERE id = 1",
            [],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .op("read federation secret")
    }

    fn put_session_dir(&self, e: &SessionDirEntry) -> Result<(), StoreError> {
        self.write_conn()
            .execute(
                "INSERT INTO game_session_dir (session_id, key_id, node_id, gateway_id, game, \
                 width, height, fps, bitrate_kbps, resume_token_sha256, updated_at_ms, codec) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
                 ON CONFLICT (session_id) DO UPDATE SET key_id = excluded.key_id, \
                 node_id = excluded.node_id, gateway_id = excluded.gateway_id, \
                 game = excluded.game, width = excluded.width, height = excluded.height, \
                 fps = excluded.fps, bitrate_kbps = excluded.bitrate_kbps, \
                 resume_token_sha256 = excluded.resume_token_sha256, \
                 updated_at_ms = excluded.updated_at_ms, codec = excluded.codec",
                params![
                    e.session_id as i64,
                    e.key_id,
                    e.node_id,
                    e.gateway_id,
                    e.game,
                    e.width,
                    e.height,
                    e.fps,
                    e.bitrate_kbps,
                    e.resume_token_sha256,
                    saturating_i64(e.updated_at_ms),
                    e.codec.as_str(),
                ],
            )
            .op("put session directory entry")?;
        Ok(())
    }

    fn get_session_dir(&self, session_id: u64) -> Result<Option<SessionDirEntry>, StoreError> {
        self.conn()
            .query_row(
                "SELECT session_id, key_id, node_id, gateway_id, game, width, height, fps, \
                 bitrate_kbps, resume_token_sha256, updated_at_ms, codec FROM game_session_dir \
                 WHERE session_id = ?1",
                [session_id as i64],
                |r| {
                    Ok(SessionDirEntry {
                        session_id: r.get::<_, i64>(0)? as u64,
                        key_id: r.get(1)?,
                        node_id: r.get(2)?,
                        gateway_id: r.get(3)?,
                        game: r.get(4)?,
                        width: r.get(5)?,
                        height: r.get(6)?,
                        fps: r.get(7)?,
                        bitrate_kbps: r.get(8)?,
                        resume_token_sha256: r.get(9)?,
                        updated_at_ms: get_u64(r, 10)?,
                        codec: codec_of(&r.get::<_, String>(11)?),
                    })
                },
            )
            .optional()
            .op("get session directory entry")
    }

    fn remove_session_dir(&self, session_id: u64, gateway_id: &str) -> Result<(), StoreError> {
        self.write_conn()
            .execute(
                "DELETE FROM game_session_dir WHERE session_id = ?1 AND gateway_id = ?2",
                params![session_id as i64, gateway_id],
            )
            .op("remove session directory entry")?;
        Ok(())
    }
    // ---- Federation: gateway and node directories (`sqlite/directory.rs`).
    fn gateway_heartbeat(&self, record: &super::GatewayRecord) -> Result<(), StoreError> {
        self.dir_heartbeat(record)
    }
    fn gateway_join(
        &self,
        record: &super::GatewayRecord,
        now_ms: u64,
    ) -> Result<Option<super::GatewayRecord>, StoreError> {
        self.dir_join(record, now_ms)
    }
    fn gateway_leave(&self, gateway_id: &str) -> Result<(), StoreError> {
        self.dir_leave(gateway_id)
    }
    fn list_gateways(&self) -> Result<Vec<super::GatewayRecord>, StoreError> {
        self.dir_list_gateways()
    }
    fn publish_nodes(
        &self,
        gateway_id: &str,
        nodes: &[super::NodeDirEntry],
    ) -> Result<(), StoreError> {
        self.dir_publish_nodes(gateway_id, nodes)
    }
    fn list_node_directory(&self) -> Result<Vec<super::NodeDirEntry>, StoreError> {
        self.dir_list_nodes()
    }

    fn record_check(&self, rec: &super::CheckRecordRow) -> Result<(), StoreError> {
        self.chk_record(rec)
    }
    fn checks_of(
        &self,
        node_id: &str,
        limit: usize,
    ) -> Result<Vec<super::CheckRecordRow>, StoreError> {
        self.chk_list(node_id, limit)
    }
    fn latest_votes(&self, node_id: &str) -> Result<Vec<super::CheckVote>, StoreError> {
        self.chk_votes(node_id)
    }
    fn prune_checks(&self, older_than_ms: u64) -> Result<u64, StoreError> {
        self.chk_prune(older_than_ms)
    }
    fn record_node_gpus(
        &self,
        node_id: &str,
        gateway_id: &str,
        gpus: &[super::GpuIdentityRow],
        seen_at_ms: u64,
    ) -> Result<super::GpuSetChange, StoreError> {
        self.gpu_record(node_id, gateway_id, gpus, seen_at_ms)
    }
    fn node_gpus(&self, node_id: &str) -> Result<Vec<super::GpuIdentityRow>, StoreError> {
        self.gpu_list(node_id)
    }
    fn gpu_uuid_holders(
        &self,
        uuids: &[String],
        live_since_ms: u64,
    ) -> Result<Vec<super::GpuHolder>, StoreError> {
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
    fn load_verification(
        &self,
        node_id: &str,
    ) -> Result<Option<super::VerificationSnapshot>, StoreError> {
        self.ver_load(node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> UsageRecord {
        UsageRecord {
            id: None,
            at_ms: 1_000 + n,
            kind: UsageKind::Inference,
            request_id: format!("req-{n}"),
            tenant: "t".into(),
            api_key_id: "key_x".into(),
            node_id: "node-1".into(),
            operator_id: "op_x".into(),
            workload: "m".into(),
            outcome: "ok".into(),
            prompt_tokens: n,
            completion_tokens: 1,
            ttft_ms: None,
            duration_ms: 1.0,
            gpu_seconds: 0.5,
            frames: 0,
            bytes: 0,
            node_prompt_tokens: None,
            node_completion_tokens: None,
        }
    }

    /// `then` of [`Store::append_usage_then`]: sends its outcome to the returned receiver.
    fn then_to_channel() -> (UsageThen, mpsc::Receiver<Result<i64, StoreError>>) {
        let (tx, rx) = mpsc::channel();
        (
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
            rx,
        )
    }

    #[test]
    fn append_usage_then_answers_after_the_commit_and_refuses_what_append_refuses() {
        let store = Arc::new(SqliteStore::open_in_memory().expect("open"));
        let (then, answer) = then_to_channel();
        store.clone().append_usage_then(record(1), then);
        let id = answer
            .recv_timeout(Duration::from_secs(10))
            .expect("answered")
            .expect("committed");
        // Answered after the commit: the record is there to read.
        let listed = store.list_usage(10).expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, Some(id));
        // A record the ledger refuses gets the same error through `then`, and nothing is kept.
        let mut bad = record(2);
        bad.request_id = "x".repeat(100_000);
        let (then, answer) = then_to_channel();
        store.clone().append_usage_then(bad, then);
        assert!(answer
            .recv_timeout(Duration::from_secs(10))
            .expect("answered")
            .is_err());
        assert_eq!(store.list_usage(10).expect("list").len(), 1);
    }

    #[test]
    fn append_usage_then_after_writer_stops_reports_closed() {
        let mut store = SqliteStore::open_in_memory().expect("open");
        store.writer.take();
        if let Some(t) = store.writer_thread.take() {
            t.join().expect("writer exits cleanly");
        }
        let (then, answer) = then_to_channel();
        Arc::new(store).append_usage_then(record(1), then);
        assert!(matches!(
            answer.recv().expect("answered"),
            Err(StoreError::Closed)
        ));
    }

    #[test]
    fn append_after_writer_stops_reports_closed() {
        let mut store = SqliteStore::open_in_memory().expect("open");
        assert!(store.append_usage(record(1)).is_ok());
        // Simulate the shutdown path: the sender is gone and the writer has exited.
        store.writer.take();
        if let Some(t) = store.writer_thread.take() {
            t.join().expect("writer exits cleanly");
        }
        assert!(matches!(
            store.append_usage(record(2)),
            Err(StoreError::Closed)
        ));
        // Reads still work on the main connection.
        assert_eq!(store.list_usage(10).expect("list").len(), 1);
    }

    #[test]
    fn failed_batch_retries_records_alone() {
        let mut conn = Connection::open_in_memory().expect("open");
        migrate(&mut conn, Path::new(":memory:")).expect("migrate");
        let mut conn = WriterConn {
            kind: WriterConnKind::Own(conn),
            gate: Arc::new(Mutex::new(())),
        };
        let counters = WriterCounters::default();
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        for n in 0..3 {
            let mut row = UsageRow::new(record(n)).expect("valid");
            if n == 1 {
                // `UsageRow::new` cannot produce this; the table's CHECK refuses it, which makes
                // the whole batch fail and forces the one-by-one retry.
                row.kind = "bogus";
            }
            let (reply, answer) = mpsc::sync_channel(1);
            batch.push(Job {
                row,
                replace: None,
                reply: Reply::Wait(reply),
            });
            answers.push(answer);
        }
        commit_jobs(&mut conn, &mut batch, &counters);
        assert!(batch.is_empty());
        let results: Vec<_> = answers
            .iter()
            .map(|a| a.recv().expect("every job is answered"))
            .collect();
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(
            matches!(
                results[1],
                Err(StoreError::Sqlite {
                    op: "insert usage record",
                    ..
                })
            ),
            "{:?}",
            results[1]
        );
        assert!(results[2].is_ok(), "{:?}", results[2]);
        assert_eq!(counters.batches.load(Ordering::Relaxed), 2);
        assert_eq!(counters.records.load(Ordering::Relaxed), 2);
        assert_eq!(counters.failed.load(Ordering::Relaxed), 1);
        assert_eq!(
            counters.attempts.load(Ordering::Relaxed),
            4,
            "one batch, three retries"
        );
        let stored: i64 = conn.with(|c| {
            c.query_row("SELECT count(*) FROM usage_records", [], |r| r.get(0))
                .expect("count")
        });
        assert_eq!(stored, 2);
    }

    #[test]
    fn a_locked_database_fails_the_whole_batch_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("locked.db");
        drop(SqliteStore::open(&path).expect("create"));
        let conn = Connection::open(&path).expect("open");
        configure(&conn, Duration::from_millis(20)).expect("configure");
        let mut conn = WriterConn {
            kind: WriterConnKind::Own(conn),
            gate: Arc::new(Mutex::new(())),
        };
        let holder = Connection::open(&path).expect("holder");
        holder.execute_batch("BEGIN EXCLUSIVE").expect("lock");

        let counters = WriterCounters::default();
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        for n in 0..5 {
            let (reply, answer) = mpsc::sync_channel(1);
            batch.push(Job {
                row: UsageRow::new(record(n)).expect("valid"),
                replace: None,
                reply: Reply::Wait(reply),
            });
            answers.push(answer);
        }
        commit_jobs(&mut conn, &mut batch, &counters);
        for answer in &answers {
            match answer.recv().expect("every job is answered") {
                Err(e) => assert!(e.is_retryable(), "{e:?}"),
                Ok(id) => panic!("committed {id} through a held lock"),
            }
        }
        assert_eq!(
            counters.attempts.load(Ordering::Relaxed),
            1,
            "a lock is not worth retrying record by record"
        );
        assert_eq!(counters.failed.load(Ordering::Relaxed), 5);
    }

    /// Polls `cond` for up to five seconds.
    fn within_5s(cond: impl Fn() -> bool) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn a_ledger_that_cannot_commit_is_unhealthy_until_a_probe_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        let store =
            SqliteStore::open_with_busy_timeout(&path, Duration::from_millis(20)).expect("open");
        assert!(store.append_usage(record(1)).is_ok());
        assert!(store.ledger_health().healthy);
        let holder = Connection::open(&path).expect("holder");
        holder.execute_batch("BEGIN IMMEDIATE").expect("lock");
        assert!(store.append_usage(record(2)).is_err());
        let h = store.ledger_health();
        assert!(!h.healthy, "{h:?}");
        assert!(h.write_failures >= 1, "{h:?}");
        // Probes keep failing (and counting) while the lock is held.
        assert!(within_5s(|| store.ledger_health().write_failures >= 2));
        assert!(!store.ledger_health().healthy);
        holder.execute_batch("ROLLBACK").expect("unlock");
        // No usage write is needed to notice the recovery: the probe does.
        assert!(within_5s(|| store.ledger_health().healthy));
        assert!(store.append_usage(record(3)).is_ok());
        assert_eq!(store.list_usage(10).expect("list").len(), 2);
    }

    #[test]
    fn a_full_database_marks_the_ledger_unhealthy() {
        let mut conn = Connection::open_in_memory().expect("open");
        migrate(&mut conn, Path::new(":memory:")).expect("migrate");
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("page_count");
        // What a full disk looks like to SQLite: no page can be added (SQLITE_FULL).
        let _: i64 = conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })
            .expect("max_page_count");
        let mut conn = WriterConn {
            kind: WriterConnKind::Own(conn),
            gate: Arc::new(Mutex::new(())),
        };
        let counters = WriterCounters::default();
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        for n in 0..50 {
            let mut r = record(n);
            r.workload = "w".repeat(4000);
            let (reply, answer) = mpsc::sync_channel(1);
            batch.push(Job {
                row: UsageRow::new(r).expect("valid"),
                replace: None,
                reply: Reply::Wait(reply),
            });
            answers.push(answer);
        }
        commit_jobs(&mut conn, &mut batch, &counters);
        for a in &answers {
            assert!(a.recv().expect("answered").is_err());
        }
        assert!(!counters.healthy.load(Ordering::Acquire));
        assert_eq!(counters.failed.load(Ordering::Relaxed), 50);
    }

    #[test]
    fn update_usage_rewrites_a_record_in_place() {
        let store = SqliteStore::open_in_memory().expect("open");
        let mut r = record(1);
        r.outcome = "in_progress".into();
        let id = store.append_usage(r.clone()).expect("append");
        r.outcome = "ok".into();
        r.frames = 42;
        r.node_completion_tokens = Some(7);
        assert_eq!(store.update_usage(id, r).expect("update"), id);
        let rows = store.list_usage(10).expect("list");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].id, Some(id));
        assert_eq!((rows[0].outcome.as_str(), rows[0].frames), ("ok", 42));
        assert_eq!(rows[0].node_completion_tokens, Some(7));
        assert!(matches!(
            store.update_usage(id + 1, record(2)),
            Err(StoreError::NotFound { .. })
        ));
    }
}
