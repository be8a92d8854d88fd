//! The gateway's durable store: operators and their KYC status, enrolment tokens, API keys, per-node
//! SLA records, penalty events and the usage ledger (DESIGN.md section 6).
//!
//! [`Store`] is the interface the rest of the gateway programs against, so that a PostgreSQL
//! implementation can be added for deployments with several gateways sharing one database.
//! [`SqliteStore`] is the single-gateway implementation.
//!
//! # Calling from async code
//!
//! Every method is synchronous and may block on disk I/O (an `fsync` per commit), on a lock held
//! by another connection (up to the busy timeout), or, for [`Store::append_usage`], on the group
//! commit of the batch it joined. Async code must therefore call the store through
//! [`tokio::task::spawn_blocking`] (or `block_in_place`), never directly on a runtime worker:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use nearpath_gateway::store::{Store, SqliteStore};
//! # async fn example(store: Arc<dyn Store>) -> anyhow::Result<()> {
//! let key = tokio::task::spawn_blocking({
//!     let store = Arc::clone(&store);
//!     move || store.authenticate_api_key("npk_...")
//! })
//! .await??;
//! # let _ = key;
//! # Ok(())
//! # }
//! ```
//!
//! # Secrets
//!
//! Enrolment tokens (`npt_…`) and API keys (`npk_…`) are 32 random bytes, hex encoded, shown to
//! their owner once and stored only as SHA-256 digests. See [`hash_secret`] for why a fast hash is
//! the right choice for such secrets.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use nearpath_protocol::message::VideoCodec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod checker;
pub mod directory;
pub mod pg;
pub mod secret;
mod sqlite;

pub use checker::{
    CheckRecordRow, CheckVote, GpuHolder, GpuIdentityRow, GpuSetChange, VerificationSnapshot,
    MAX_CHECKS_LIST, MAX_CHECKS_PER_NODE, MAX_CHECK_DETAIL_BYTES, MAX_GPUS, MAX_GPU_UUID_BYTES,
};
pub use pg::PgStore;
pub use sqlite::{SqliteStore, WriterStats, DEFAULT_BUSY_TIMEOUT, SCHEMA_VERSION};

/// Prefix of enrolment token secrets.
pub const ENROLMENT_TOKEN_PREFIX: &str = "npt_";
/// Prefix of API key secrets.
pub const API_KEY_PREFIX: &str = "npk_";
/// Longest operator name or tenant, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest identifier (node id, operator id, request id, ...), in characters.
pub const MAX_ID_CHARS: usize = 256;
/// Longest free-text field (penalty detail, workload, outcome, ...), in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest secret accepted by [`Store::insert_api_key_secret`] or the authenticate methods, in bytes.
pub const MAX_SECRET_BYTES: usize = 512;

/// Errors from the store. Each says which operation failed, and [`StoreError::is_retryable`] says
/// whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database engine failed during `op`.
    #[error("store: {op} failed: {source}")]
    Sqlite {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// Opening or preparing the database file at `path` failed (not a database, unreadable, ...).
    #[error("store database {}: {op} failed: {source}", path.display())]
    Open {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// The directory that should contain the database file does not exist; the store does not
    /// create directories, so that a typo in the configuration is noticed rather than silently
    /// starting a fresh ledger somewhere else.
    #[error("store database {}: directory {} does not exist", path.display(), dir.display())]
    MissingDirectory { path: PathBuf, dir: PathBuf },
    /// The file is an SQLite database that belongs to some other application; the store refuses to
    /// add its tables to it.
    #[error(
        "store database {}: not a Nearpath gateway database (application_id {application_id:#x}, {tables} tables)",
        path.display()
    )]
    ForeignDatabase {
        path: PathBuf,
        application_id: i32,
        tables: u64,
    },
    /// The database was written by a newer gateway whose schema this build does not know.
    #[error(
        "store database {}: schema version {found} is newer than the newest this gateway supports ({supported}); upgrade the gateway or restore a backup",
        path.display()
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// The database file cannot be used the way the store needs (for example, write-ahead logging
    /// is unavailable on its filesystem).
    #[error("store database {}: {message}", path.display())]
    Unsupported { path: PathBuf, message: String },
    /// An operating-system call failed during `op`.
    #[error("store: {op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// No record of this kind has this id.
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    /// The caller passed a value the store does not accept.
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The store's background writer has stopped (the store is shutting down or the writer died).
    #[error("store is closed")]
    Closed,
    /// PostgreSQL failed during `op` (see [`StoreError::is_retryable`] for which failures are
    /// transient: lost connections, serialization failures, deadlocks, pool timeouts).
    #[error("store (PostgreSQL): {op} failed: {source}")]
    Postgres {
        op: &'static str,
        #[source]
        source: postgres::Error,
    },
    /// No PostgreSQL connection could be had within `store.connect_timeout_ms` (the database
    /// is down, unreachable or every pooled connection is busy). Retryable.
    #[error("store (PostgreSQL): no connection: {message}")]
    Unavailable { message: String },
    /// This store does not implement `op` (a federation feature on a store that lacks it).
    #[error("store: {op} is not supported by this store")]
    NotSupported { op: &'static str },
}

impl StoreError {
    /// True when the failure is transient (another connection held a lock for longer than the
    /// busy timeout) and the same call may succeed if repeated.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Postgres { source, .. } => pg::is_transient(source),
            StoreError::Unavailable { .. } => true,
            StoreError::Sqlite { source, .. } | StoreError::Open { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            _ => false,
        }
    }

    /// True when the caller is to blame (bad input or an unknown id), as opposed to the store.
    pub fn is_caller_error(&self) -> bool {
        matches!(
            self,
            StoreError::NotFound { .. } | StoreError::Invalid { .. }
        )
    }
}

/// KYC status of a node operator. Only verified operators' enrolment tokens onboard nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KycStatus {
    Pending,
    Verified,
    Suspended,
}

impl KycStatus {
    /// The lowercase name used in the database and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            KycStatus::Pending => "pending",
            KycStatus::Verified => "verified",
            KycStatus::Suspended => "suspended",
        }
    }
}

impl fmt::Display for KycStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KycStatus {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(KycStatus::Pending),
            "verified" => Ok(KycStatus::Verified),
            "suspended" => Ok(KycStatus::Suspended),
            other => Err(StoreError::Invalid {
                field: "kyc_status",
                message: format!("{other:?} is not one of pending, verified, suspended"),
            }),
        }
    }
}

/// A node operator (a company or person running `edge-node` on their GPUs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    /// `op_` followed by 16 hex digits.
    pub id: String,
    pub name: String,
    pub kyc_status: KycStatus,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// An enrolment token, without its secret (which is shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentToken {
    /// `tok_` followed by 16 hex digits.
    pub id: String,
    pub operator_id: String,
    pub created_at_ms: u64,
    /// The first characters of the secret, so that an operator can tell tokens apart.
    pub prefix: String,
    /// Revoked tokens no longer authenticate.
    pub revoked: bool,
}

/// An API key for an app or a player, without its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    /// `key_` followed by 16 hex digits.
    pub id: String,
    pub tenant: String,
    /// Rate limits are stored, not interpreted: the gateway's limiter gives them meaning.
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    pub created_at_ms: u64,
    /// Revoked keys no longer authenticate.
    pub revoked: bool,
    /// The first characters of the secret, for recognising a key in listings.
    pub prefix: String,
    /// Per-key caps on concurrent work; each `None` means the gateway-wide default.
    #[serde(default)]
    pub caps: KeyCaps,
    /// Which models, until when, and how much (allow-list, expiry, budgets); shown flat in
    /// JSON, as the admin API takes it.
    #[serde(default, flatten)]
    pub policy: KeyPolicy,
}

/// Longest entry of a key's model allow-list, in bytes.
pub const MAX_ALLOWED_MODEL_BYTES: usize = 256;
/// Most entries of a key's model allow-list.
pub const MAX_ALLOWED_MODELS: usize = 256;
/// Largest token budget (2^53: every value up to it is exact as a JSON number and an f64).
pub const MAX_TOKEN_BUDGET: u64 = 1 << 53;

/// What a key may use: its models, its lifetime and its budgets. Every field is optional and
/// absent means unrestricted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyPolicy {
    /// Model names, or prefixes ending in `*` (`org/*`; `*` alone is every model). Empty:
    /// every model.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// From this Unix time in milliseconds the key no longer authenticates (401
    /// `key_expired`); sessions already running are not cut.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    /// Tokens (prompt + completion, as billed) per UTC day.
    #[serde(default)]
    pub budget_tokens_per_day: Option<u64>,
    /// Tokens per UTC calendar month.
    #[serde(default)]
    pub budget_tokens_per_month: Option<u64>,
    /// US dollars per UTC day, at the gateway's `inference.prices`.
    #[serde(default)]
    pub budget_usd_per_day: Option<f64>,
    /// US dollars per UTC calendar month.
    #[serde(default)]
    pub budget_usd_per_month: Option<f64>,
}

impl KeyPolicy {
    /// Whether `model` is on the allow-list (an empty list allows every model). An entry ending
    /// in `*` allows every model whose name starts with what precedes it.
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.is_empty()
            || self
                .allowed_models
                .iter()
                .any(|e| match e.strip_suffix('*') {
                    Some(prefix) => model.starts_with(prefix),
                    None => e == model,
                })
    }

    /// Checks every field: allow-list entries 1..=256 bytes without control characters, `*`
    /// only at the end, at most 256 of them; budgets finite and not negative, token budgets at
    /// most 2^53.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_allowed_models(&self.allowed_models)?;
        for (field, v) in [
            ("budget_tokens_per_day", self.budget_tokens_per_day),
            ("budget_tokens_per_month", self.budget_tokens_per_month),
        ] {
            if v.is_some_and(|v| v > MAX_TOKEN_BUDGET) {
                return Err(StoreError::Invalid {
                    field,
                    message: format!("at most {MAX_TOKEN_BUDGET}"),
                });
            }
        }
        for (field, v) in [
            ("budget_usd_per_day", self.budget_usd_per_day),
            ("budget_usd_per_month", self.budget_usd_per_month),
        ] {
            if let Some(v) = v {
                check_measure(field, v)?;
            }
        }
        if self
            .expires_at_ms
            .is_some_and(|v| i64::try_from(v).is_err())
        {
            return Err(StoreError::Invalid {
                field: "expires_at_ms",
                message: "larger than the largest storable time".into(),
            });
        }
        Ok(())
    }
}

/// Checks a model allow-list (see [`KeyPolicy::validate`]).
pub fn check_allowed_models(list: &[String]) -> Result<(), StoreError> {
    let field = "allowed_models";
    if list.len() > MAX_ALLOWED_MODELS {
        return Err(StoreError::Invalid {
            field,
            message: format!(
                "{} entries, at most {MAX_ALLOWED_MODELS} allowed",
                list.len()
            ),
        });
    }
    for (i, e) in list.iter().enumerate() {
        let problem = if e.is_empty() {
            Some("is empty".to_string())
        } else if e.len() > MAX_ALLOWED_MODEL_BYTES {
            Some(format!(
                "is {} bytes, at most {MAX_ALLOWED_MODEL_BYTES} allowed",
                e.len()
            ))
        } else if e.chars().any(char::is_control) {
            Some("contains control characters".to_string())
        } else if e.trim_end_matches('*').contains('*') || e.ends_with("**") {
            Some("may have `*` only once, at the end (a prefix such as `org/*`)".to_string())
        } else {
            None
        };
        if let Some(p) = problem {
            return Err(StoreError::Invalid {
                field,
                message: format!("entry {i} {p}"),
            });
        }
    }
    Ok(())
}

/// Caps on what one API key may hold at once, enforced on every entry point (HTTP and QUIC
/// inference, QUIC play, WHEP). `None` means the gateway-wide default from the configuration
/// (`inference.default_max_concurrent_streams`, `game.default_max_concurrent_sessions`,
/// `game.default_session_starts_per_minute`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCaps {
    /// Inference requests in flight at once.
    pub max_concurrent_streams: Option<u32>,
    /// Game sessions (native and browser) live at once.
    pub max_concurrent_sessions: Option<u32>,
    /// Game sessions started per minute (a token bucket refilled continuously).
    pub session_starts_per_minute: Option<u32>,
}

/// A change to an API key's limits through [`Store::update_api_key`]: `None` leaves a field as
/// it is; for the caps, `Some(None)` resets the field to the gateway-wide default, and for the
/// policy fields `Some(None)` (an empty allow-list) removes the restriction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApiKeyUpdate {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub max_concurrent_streams: Option<Option<u32>>,
    pub max_concurrent_sessions: Option<Option<u32>>,
    pub session_starts_per_minute: Option<Option<u32>>,
    pub allowed_models: Option<Vec<String>>,
    pub expires_at_ms: Option<Option<u64>>,
    pub budget_tokens_per_day: Option<Option<u64>>,
    pub budget_tokens_per_month: Option<Option<u64>>,
    pub budget_usd_per_day: Option<Option<f64>>,
    pub budget_usd_per_month: Option<Option<f64>>,
}

impl ApiKeyUpdate {
    /// Applies the change to `key` (without validating it).
    pub fn apply(&self, key: &mut ApiKey) {
        fn set<T: Clone>(field: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *field = v.clone();
            }
        }
        set(&mut key.requests_per_minute, &self.requests_per_minute);
        set(&mut key.tokens_per_minute, &self.tokens_per_minute);
        set(
            &mut key.caps.max_concurrent_streams,
            &self.max_concurrent_streams,
        );
        set(
            &mut key.caps.max_concurrent_sessions,
            &self.max_concurrent_sessions,
        );
        set(
            &mut key.caps.session_starts_per_minute,
            &self.session_starts_per_minute,
        );
        let p = &mut key.policy;
        set(&mut p.allowed_models, &self.allowed_models);
        set(&mut p.expires_at_ms, &self.expires_at_ms);
        set(&mut p.budget_tokens_per_day, &self.budget_tokens_per_day);
        set(
            &mut p.budget_tokens_per_month,
            &self.budget_tokens_per_month,
        );
        set(&mut p.budget_usd_per_day, &self.budget_usd_per_day);
        set(&mut p.budget_usd_per_month, &self.budget_usd_per_month);
    }
}

/// One key's inference usage of one model on one UTC day, from the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyDayUsage {
    pub api_key_id: String,
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Accumulated service record of one node of one operator; feeds the routing reliability
/// penalty. Keyed by (operator, node), so that no operator ever inherits another's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlaRecord {
    pub node_id: String,
    /// The operator whose node this is.
    pub operator_id: String,
    pub first_registered_at_ms: u64,
    pub last_seen_at_ms: u64,
    /// Total time spent registered (uptime), in milliseconds.
    pub registered_ms: u64,
    pub registrations: u64,
    pub sessions_served: u64,
    pub sessions_failed: u64,
    pub heartbeat_misses: u64,
    pub penalty_events: u64,
    /// The most recent gateway->node RTT measurement, if any was ever reported.
    pub last_rtt_ms: Option<f64>,
}

/// Increments applied to a node's [`SlaRecord`] by [`Store::sla_apply`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SlaDelta {
    pub registered_ms: u64,
    pub registrations: u64,
    pub sessions_served: u64,
    pub sessions_failed: u64,
    pub heartbeat_misses: u64,
    /// Replaces the stored RTT when present; `None` keeps the previous measurement.
    pub last_rtt_ms: Option<f64>,
    /// When this delta was observed; `last_seen_at_ms` becomes the later of this and the stored
    /// value, and a new record starts its `first_registered_at_ms` here.
    pub seen_at_ms: u64,
}

/// A node disconnected with active sessions without draining first (or a similar fault).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PenaltyEvent {
    pub id: i64,
    pub node_id: String,
    pub operator_id: String,
    pub at_ms: u64,
    /// What happened, e.g. `disconnect_without_drain`.
    pub kind: String,
    pub active_sessions: u32,
    pub detail: String,
}

/// A GPU model name the gateway has seen or an admin has classified (see `gpu_class.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuModelRecord {
    /// The normalised model key (`h100`, `acmeturbo9000`).
    pub model_key: String,
    /// A model name as a node reported it (the first one seen, or the admin's).
    pub example: String,
    /// The class an admin gave it; `None` while it is unclassified (and treated as controlled).
    pub class: Option<String>,
    pub first_seen_at_ms: u64,
    pub last_seen_at_ms: u64,
    /// Registrations that reported this model while it was unclassified.
    pub seen: u64,
    pub classified_at_ms: Option<u64>,
}

/// What a usage record meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageKind {
    Inference,
    Game,
}

impl UsageKind {
    /// The lowercase name used in the database and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::Inference => "inference",
            UsageKind::Game => "game",
        }
    }
}

impl fmt::Display for UsageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UsageKind {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inference" => Ok(UsageKind::Inference),
            "game" => Ok(UsageKind::Game),
            other => Err(StoreError::Invalid {
                field: "kind",
                message: format!("{other:?} is not one of inference, game"),
            }),
        }
    }
}

/// One metered session or request in the usage ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Assigned by the ledger; ignored by [`Store::append_usage`].
    pub id: Option<i64>,
    pub at_ms: u64,
    pub kind: UsageKind,
    pub request_id: String,
    pub tenant: String,
    pub api_key_id: String,
    /// Empty when the request never reached a node (for example no eligible node).
    pub node_id: String,
    pub operator_id: String,
    /// The model name or game title.
    pub workload: String,
    /// `ok`, `error`, `cancelled`, ...; anything but `ok`, `cancelled` and `in_progress` counts
    /// as an error. `in_progress` marks a game session's checkpoint row, rewritten in place every
    /// `game.usage_checkpoint_ms` and finalised with the session's outcome when it ends.
    pub outcome: String,
    /// Prompt tokens billed: the gateway's estimate from the prompt's size, never the node's word.
    pub prompt_tokens: u64,
    /// Completion tokens billed: the pieces the gateway relayed, at most `max_tokens`.
    pub completion_tokens: u64,
    /// What the node's `Done` claimed, kept beside the billed counts for audits; `None` when
    /// the node reported nothing (no `Done`, or a game session).
    pub node_prompt_tokens: Option<u64>,
    pub node_completion_tokens: Option<u64>,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    pub gpu_seconds: f64,
    pub frames: u64,
    pub bytes: u64,
}

/// The usage ledger's state, as [`Store::ledger_health`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerHealth {
    /// False from a failed commit (disk full, I/O error, lock held past the busy timeout) until
    /// the next successful one; the writer probes with a small write while it is false.
    pub healthy: bool,
    /// Usage records and health probes that could not be committed, since the store opened.
    pub write_failures: u64,
}

/// Usage totals for one tenant or one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// The tenant or the node id.
    pub key: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub gpu_seconds: f64,
    pub frames: u64,
    pub bytes: u64,
    /// Records whose outcome is neither `ok`, `cancelled` nor `in_progress`.
    pub errors: u64,
}

/// Usage totals grouped by tenant and by node, each sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageSummary {
    pub by_tenant: Vec<UsageTotals>,
    /// Records without a node (empty `node_id`) are left out here but counted under their tenant.
    pub by_node: Vec<UsageTotals>,
}

/// One gateway in the federation's directory (table `gateways`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayRecord {
    /// `federation.gateway_id`.
    pub id: String,
    pub region: String,
    pub lat: f64,
    pub lon: f64,
    /// Where nodes, native clients and peer gateways reach it over QUIC (`host:port`).
    pub quic_address: String,
    /// The base URL of its client HTTP API.
    pub http_url: String,
    /// SHA-256 of its QUIC certificate (DER), 64 lowercase hex digits: what nodes pin, and what
    /// peers check on the `nearpath-peer/1` trunk.
    pub cert_sha256: String,
    /// The gateway software version (`x.y.z`).
    pub version: String,
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
    /// The entry is dead after this unless renewed.
    pub expires_at_ms: u64,
}

impl GatewayRecord {
    /// True while the lease holds at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }
}

/// One live node as published by the gateway that holds its connection (table `node_directory`).
/// Published at `federation.node_directory_interval_ms`, not per heartbeat: load figures are
/// up to that old.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDirEntry {
    pub node_id: String,
    pub operator_id: String,
    /// The gateway holding the node's connection.
    pub gateway_id: String,
    /// Where GeoIP placed the node (ISO country, and coordinates when known).
    pub country: Option<String>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    /// GPU classes the node was admitted with (e.g. `h100`, `consumer`).
    pub gpu_classes: Vec<String>,
    /// Models it serves and game titles it runs.
    pub models: Vec<String>,
    pub games: Vec<String>,
    pub inference_slots: u32,
    pub inference_free: u32,
    pub game_slots: u32,
    pub game_free: u32,
    /// Draining, suspended or otherwise not taking new sessions.
    pub accepting: bool,
    /// What the gateway has verified about the node's claims (`unverified` until the checkers
    /// of issue 14 run).
    pub verification: String,
    pub updated_at_ms: u64,
    /// The video encoders the node registered (protocol version 3), one per codec. Empty: the
    /// node encodes H.264 only, as every node does that lists none; rows written before the
    /// directory carried encoders read as empty too.
    #[serde(default)]
    pub encoders: Vec<DirEncoder>,
    /// What each model of `models` supports beyond plain text, by position, as the wire's
    /// capability bits ([`nearpath_protocol::ModelCaps`]); never longer than `models`, and a
    /// model past its end declares nothing. Rows written before the directory carried them
    /// read as empty: a request needing a capability then stays on its own gateway's nodes.
    #[serde(default)]
    pub model_caps: Vec<u32>,
    /// Where GeoIP placed the node within `country`: its ISO 3166-2 subdivision with the country
    /// prefix (`UA-43`), when the gateway's database knows one. Geofence rules naming a
    /// subdivision judge a remote node by it, as they judge a local one. A value that does not
    /// parse or names another country is refused on write and reads as absent, and rows
    /// written before the directory carried it read as absent too.
    #[serde(default)]
    pub subdivision: Option<String>,
}

/// One video encoder in the node directory. The codec is kept as its wire name rather than a
/// [`VideoCodec`]: a newer gateway may publish a codec this build does not know, which then
/// simply matches nothing here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEncoder {
    /// The codec's wire name (`h264`, `hevc`, `av1`).
    pub codec: String,
    /// The implementation (`x264`, `hevc_nvenc`, ...), for fleet views.
    pub implementation: String,
}

impl NodeDirEntry {
    /// Whether the node encodes `codec`: one of its encoders produces it, or it lists none and
    /// `codec` is H.264.
    pub fn encodes(&self, codec: VideoCodec) -> bool {
        if self.encoders.is_empty() {
            return codec == VideoCodec::H264;
        }
        self.encoders.iter().any(|e| e.codec == codec.as_str())
    }
}

/// The per-key limits shared by a federation's gateways (issue 13), by pool: the three
/// per-minute pools leased in slices with [`Store::lease_units`], and the two concurrency pools
/// published with [`Store::publish_holds`]. Anything else is refused as `pool`.
pub const LIMIT_POOLS: &[&str] = &[
    "requests",
    "tokens",
    "session_starts",
    "streams",
    "sessions",
];

/// The length of a limit window, in milliseconds: per-minute limits count in windows aligned to
/// the wall clock's minutes.
pub const LIMIT_WINDOW_MS: u64 = 60_000;

/// The most holds one [`Store::publish_holds`] call may carry (a gateway publishes one per key
/// and pool it holds work of).
pub const MAX_HOLDS_PER_PUBLISH: usize = 10_000;

/// What one gateway holds of one key's concurrency pool, published with an expiry (table
/// `limit_holds`): a gateway that stops renewing its holds stops counting once they expire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetHold {
    pub gateway_id: String,
    pub key_id: String,
    /// `streams` or `sessions`.
    pub pool: String,
    /// Units reserved: work in flight plus the slots leased ahead of it.
    pub held: u64,
    pub expires_at_ms: u64,
}

/// Checks the arguments every limit method shares: a key id of 1..=[`MAX_ID_CHARS`]
/// characters and a pool of [`LIMIT_POOLS`].
pub fn check_limit_key(key_id: &str, pool: &str) -> Result<(), StoreError> {
    check_id("key_id", key_id, false)?;
    if !LIMIT_POOLS.contains(&pool) {
        return Err(StoreError::Invalid {
            field: "pool",
            message: format!("{pool:?} is not one of {}", LIMIT_POOLS.join(", ")),
        });
    }
    Ok(())
}

/// Checks [`Store::lease_units`]' arguments and returns them as the signed integers both
/// databases store: `(window_start_ms, want, limit)`. A window must start on a minute, and no
/// count may exceed `i64::MAX` (so that `used + want` cannot overflow in SQL either).
pub fn check_lease(
    key_id: &str,
    pool: &str,
    window_start_ms: u64,
    want: u64,
    limit: u64,
) -> Result<(i64, i64, i64), StoreError> {
    check_limit_key(key_id, pool)?;
    if !window_start_ms.is_multiple_of(LIMIT_WINDOW_MS) {
        return Err(StoreError::Invalid {
            field: "window_start_ms",
            message: format!("{window_start_ms} does not start a minute"),
        });
    }
    let window = to_i64("window_start_ms", window_start_ms)?;
    // Half the range: `used + want` of two maximal values still fits in a BIGINT.
    const MAX_UNITS: u64 = (i64::MAX as u64) / 2;
    for (field, v) in [("want", want), ("limit", limit)] {
        if v > MAX_UNITS {
            return Err(StoreError::Invalid {
                field,
                message: format!("{v} exceeds the largest count {MAX_UNITS}"),
            });
        }
    }
    Ok((window, want as i64, limit as i64))
}

/// Checks [`Store::publish_holds`]' arguments.
pub fn check_holds(gateway_id: &str, holds: &[FleetHold]) -> Result<(), StoreError> {
    check_id("gateway_id", gateway_id, false)?;
    if holds.len() > MAX_HOLDS_PER_PUBLISH {
        return Err(StoreError::Invalid {
            field: "holds",
            message: format!(
                "{} holds, at most {MAX_HOLDS_PER_PUBLISH} per call",
                holds.len()
            ),
        });
    }
    for h in holds {
        if h.gateway_id != gateway_id {
            return Err(StoreError::Invalid {
                field: "holds.gateway_id",
                message: format!("{:?} is not the publishing gateway", h.gateway_id),
            });
        }
        check_limit_key(&h.key_id, &h.pool)?;
        if !matches!(h.pool.as_str(), "streams" | "sessions") {
            return Err(StoreError::Invalid {
                field: "pool",
                message: format!("{:?} is not a concurrency pool", h.pool),
            });
        }
        to_i64("held", h.held)?;
        to_i64("expires_at_ms", h.expires_at_ms)?;
    }
    Ok(())
}

/// The gateway's durable state. Object safe: the gateway holds an `Arc<dyn Store>`.
/// One live game session in the federation's sessions directory (table `game_session_dir`):
/// what another gateway needs to resume it through itself when the session's gateway dies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDirEntry {
    pub session_id: u64,
    /// The API key the session runs under (`ApiKey::id`): a resume must authenticate as it.
    pub key_id: String,
    /// The node running the game, and the gateway relaying it now.
    pub node_id: String,
    pub gateway_id: String,
    pub game: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub bitrate_kbps: u32,
    /// The session's video codec, so that a resume elsewhere reopens it in the codec its
    /// client decodes (a browser negotiated it once). Rows written before it was recorded read
    /// as H.264, which every such session was.
    #[serde(default, with = "codec_name")]
    pub codec: nearpath_protocol::message::VideoCodec,
    /// SHA-256 (lowercase hex) of the session's resume token; the token itself only the
    /// client holds.
    pub resume_token_sha256: String,
    pub updated_at_ms: u64,
}

/// A [`SessionDirEntry`]'s codec in JSON: its name (`"av1"`); an unknown name is an error.
mod codec_name {
    use nearpath_protocol::message::VideoCodec;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &VideoCodec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VideoCodec, D::Error> {
        let name = String::deserialize(d)?;
        VideoCodec::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown codec {name:?}")))
    }
}

///
/// All methods are synchronous and may block (see the module documentation): call them from
/// `tokio::task::spawn_blocking` in async code. Lists are returned in a stable order: operators,
/// tokens and keys oldest first; SLA records by node id; penalties and usage newest first.
/// What [`Store::append_usage_then`] runs with the outcome of an append: the record's id once
/// committed, or why it was not.
pub type UsageThen = Box<dyn FnOnce(Result<i64, StoreError>) + Send>;

pub trait Store: Send + Sync + 'static {
    /// Creates an operator. The name is trimmed and must then be 1..=128 characters without
    /// control characters.
    fn create_operator(&self, name: &str, kyc: KycStatus) -> Result<Operator, StoreError>;
    fn get_operator(&self, id: &str) -> Result<Option<Operator>, StoreError>;
    fn list_operators(&self) -> Result<Vec<Operator>, StoreError>;
    /// Changes an operator's KYC status (any transition is allowed; the admin decides).
    fn set_operator_kyc(&self, id: &str, status: KycStatus) -> Result<Operator, StoreError>;

    /// Creates an enrolment token for an existing operator; returns it with its secret, which is
    /// not stored and cannot be shown again.
    fn create_enrolment_token(
        &self,
        operator_id: &str,
    ) -> Result<(EnrolmentToken, String), StoreError>;
    /// Finds the unrevoked token with this secret and its operator, whatever the operator's KYC
    /// status (the caller turns a pending or suspended status into the right rejection code).
    fn authenticate_enrolment_token(
        &self,
        secret: &str,
    ) -> Result<Option<(Operator, EnrolmentToken)>, StoreError>;
    /// Revokes a token; revoking it again is not an error.
    fn revoke_enrolment_token(&self, id: &str) -> Result<(), StoreError>;
    /// The operator's tokens, revoked ones included.
    fn list_enrolment_tokens(&self, operator_id: &str) -> Result<Vec<EnrolmentToken>, StoreError>;

    /// Creates an API key with a fresh `npk_…` secret, returned once.
    fn create_api_key(
        &self,
        tenant: &str,
        requests_per_minute: u32,
        tokens_per_minute: u32,
    ) -> Result<(ApiKey, String), StoreError>;
    /// Registers a caller-chosen secret (such as the demo's fixed key). Idempotent: if the secret
    /// is already known, the existing key is returned unchanged, whatever the other arguments.
    fn insert_api_key_secret(
        &self,
        secret: &str,
        tenant: &str,
        requests_per_minute: u32,
        tokens_per_minute: u32,
    ) -> Result<ApiKey, StoreError>;
    /// The unrevoked key with this secret.
    fn authenticate_api_key(&self, secret: &str) -> Result<Option<ApiKey>, StoreError>;
    /// The unrevoked key with this id, by its primary key (as [`Store::authenticate_api_key`]
    /// finds one by its secret: a revoked key is not found). An id that no key can have (empty,
    /// over [`MAX_ID_CHARS`] characters, or holding NUL) is not found either, without asking the
    /// database: the id may come from a peer's ticket.
    fn api_key_by_id(&self, id: &str) -> Result<Option<ApiKey>, StoreError>;
    /// All keys, revoked ones included.
    fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError>;
    /// Revokes a key; revoking it again is not an error.
    fn revoke_api_key(&self, id: &str) -> Result<(), StoreError>;
    /// Changes a key's rate limits and caps (see [`ApiKeyUpdate`]) and returns the key.
    fn update_api_key(&self, id: &str, update: ApiKeyUpdate) -> Result<ApiKey, StoreError>;

    /// Claims `node_id` for `operator_id` if no operator owns it yet, atomically, and returns its
    /// owner: `operator_id` when the claim succeeded or the operator already owned it, another
    /// operator's id otherwise. A node id belongs to the first operator that used it, forever.
    fn claim_node_id(
        &self,
        node_id: &str,
        operator_id: &str,
        at_ms: u64,
    ) -> Result<String, StoreError>;
    /// The operator that owns `node_id`, if one has claimed it.
    fn node_owner(&self, node_id: &str) -> Result<Option<String>, StoreError>;

    /// Adds `delta` to the SLA record of (operator, node), creating it if needed, and returns the
    /// new record.
    fn sla_apply(
        &self,
        node_id: &str,
        operator_id: &str,
        delta: SlaDelta,
    ) -> Result<SlaRecord, StoreError>;
    /// The SLA record of `operator_id`'s node `node_id`.
    fn sla_get(&self, operator_id: &str, node_id: &str) -> Result<Option<SlaRecord>, StoreError>;
    fn sla_list(&self) -> Result<Vec<SlaRecord>, StoreError>;

    /// Records a penalty event and, in the same transaction, increments the SLA `penalty_events`
    /// of (operator, node) (creating the SLA record if needed).
    fn record_penalty(
        &self,
        node_id: &str,
        operator_id: &str,
        at_ms: u64,
        kind: &str,
        active_sessions: u32,
        detail: &str,
    ) -> Result<PenaltyEvent, StoreError>;
    /// The newest `limit` penalty events, of one node or of all.
    fn list_penalties(
        &self,
        node_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PenaltyEvent>, StoreError>;
    /// How many penalty events `operator_id`'s node `node_id` earned at or after `since_ms`.
    fn penalties_since(
        &self,
        operator_id: &str,
        node_id: &str,
        since_ms: u64,
    ) -> Result<u64, StoreError>;

    /// The class an admin gave the normalised GPU model `model_key`, if any.
    fn gpu_model_class(&self, model_key: &str) -> Result<Option<String>, StoreError>;
    /// Notes that a node reported the unclassified model `model_key` (as `example`), so that
    /// admins can find and classify it.
    fn note_unclassified_gpu_model(
        &self,
        model_key: &str,
        example: &str,
        at_ms: u64,
    ) -> Result<(), StoreError>;
    /// Classifies `model_key` as `class` (replacing an earlier classification).
    fn set_gpu_model_class(
        &self,
        model_key: &str,
        example: &str,
        class: &str,
        at_ms: u64,
    ) -> Result<GpuModelRecord, StoreError>;
    /// Every model seen unclassified or classified by an admin, by key.
    fn list_gpu_models(&self) -> Result<Vec<GpuModelRecord>, StoreError>;

    /// Appends a record to the usage ledger and returns its id once it is durably committed
    /// (it survives a crash of the gateway from then on). Concurrent callers share commits.
    fn append_usage(&self, record: UsageRecord) -> Result<i64, StoreError>;
    /// [`Store::append_usage`] without waiting: `then` gets the outcome once the record is
    /// committed (or has failed), on a thread of the store's choosing, and must not block.
    /// The default runs the blocking append on tokio's blocking pool (or inline, outside a
    /// runtime); a store with a writer thread of its own answers from that thread instead.
    fn append_usage_then(self: Arc<Self>, record: UsageRecord, then: UsageThen) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || then(self.append_usage(record)));
            }
            Err(_) => then(self.append_usage(record)),
        }
    }
    /// Replaces the usage record `id` (a game session's checkpoint row) with `record`, durably,
    /// through the same writer as [`Store::append_usage`]; returns `id`.
    fn update_usage(&self, id: i64, record: UsageRecord) -> Result<i64, StoreError>;
    /// Whether the usage ledger can commit now, and how many usage writes have failed so far.
    /// The gateway refuses new work while the ledger is unhealthy (billing must not fail open).
    fn ledger_health(&self) -> LedgerHealth {
        LedgerHealth {
            healthy: true,
            write_failures: 0,
        }
    }
    /// Totals of the records at or after `since_ms` (all records when `None`).
    fn usage_summary(&self, since_ms: Option<u64>) -> Result<UsageSummary, StoreError>;
    /// The newest `limit` usage records.
    fn list_usage(&self, limit: usize) -> Result<Vec<UsageRecord>, StoreError>;
    /// Inference usage by key, UTC day and model, of the records made in `[from_ms, to_ms)`,
    /// of one key or of all; sorted by key, day and model. What budgets count and the admin
    /// API's usage report show.
    fn key_usage_by_day(
        &self,
        api_key_id: Option<&str>,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<KeyDayUsage>, StoreError>;

    // ---- Federation (issue 13). A standalone gateway uses these too (it is a federation of
    // one), so both stores implement them; the defaults only keep test doubles short.

    /// Inserts or renews this gateway's entry in the gateway directory (`record.id` is the key;
    /// every field is replaced, `heartbeat_at_ms` and `expires_at_ms` included).
    fn gateway_heartbeat(&self, record: &GatewayRecord) -> Result<(), StoreError> {
        let _ = record;
        Err(StoreError::NotSupported {
            op: "gateway_heartbeat",
        })
    }
    /// Inserts or renews this gateway's entry like [`Store::gateway_heartbeat`], unless another
    /// entry that is live at `now_ms` holds `record.id` with a different `cert_sha256` (another
    /// gateway configured with the same id): then nothing is written and that holder is
    /// returned. Atomic, so two gateways starting with one id cannot both join.
    fn gateway_join(
        &self,
        record: &GatewayRecord,
        now_ms: u64,
    ) -> Result<Option<GatewayRecord>, StoreError> {
        let _ = (record, now_ms);
        Err(StoreError::NotSupported { op: "gateway_join" })
    }
    /// Removes a gateway's directory entry and its published nodes (orderly shutdown).
    fn gateway_leave(&self, gateway_id: &str) -> Result<(), StoreError> {
        let _ = gateway_id;
        Err(StoreError::NotSupported {
            op: "gateway_leave",
        })
    }
    /// Every gateway in the directory, expired entries included (callers judge liveness from
    /// `expires_at_ms`), ordered by id.
    fn list_gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        Err(StoreError::NotSupported {
            op: "list_gateways",
        })
    }
    /// Replaces, in one transaction, the set of live nodes `gateway_id` holds with `nodes`
    /// (each entry's `gateway_id` must equal it). A node id published by two gateways (it moved)
    /// keeps the newer entry.
    fn publish_nodes(&self, gateway_id: &str, nodes: &[NodeDirEntry]) -> Result<(), StoreError> {
        let _ = (gateway_id, nodes);
        Err(StoreError::NotSupported {
            op: "publish_nodes",
        })
    }
    /// The node directory: every published node, ordered by node id. Entries of gateways whose
    /// lease expired are included; callers filter with [`Store::list_gateways`].
    fn list_node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        Err(StoreError::NotSupported {
            op: "list_node_directory",
        })
    }

    // ---- Fleet-wide limits (issue 13, item 4).

    /// Leases up to `want` units of `key_id`'s `pool` in the window starting at
    /// `window_start_ms` (a minute boundary), never granting beyond `limit` in that window:
    /// one atomic conditional upsert of the shared counter. Returns the units granted (0 when
    /// the window is spent). A gateway asks for a slice at a time and admits locally from it.
    fn lease_units(
        &self,
        key_id: &str,
        pool: &str,
        window_start_ms: u64,
        want: u64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        let _ = (key_id, pool, window_start_ms, want, limit);
        Err(StoreError::NotSupported { op: "lease_units" })
    }
    /// Inserts or replaces `gateway_id`'s holds (each hold's `gateway_id` must equal it); a hold
    /// of 0 removes the row. Each call is its own commit, so that a gateway that publishes and
    /// then reads [`Store::fleet_holds`] is seen by any other gateway doing the same.
    fn publish_holds(&self, gateway_id: &str, holds: &[FleetHold]) -> Result<(), StoreError> {
        let _ = (gateway_id, holds);
        Err(StoreError::NotSupported {
            op: "publish_holds",
        })
    }
    /// The holds still live at `now_ms` (`expires_at_ms > now_ms`), of one key or of all,
    /// ordered by key, pool and gateway.
    fn fleet_holds(&self, key_id: Option<&str>, now_ms: u64) -> Result<Vec<FleetHold>, StoreError> {
        let _ = (key_id, now_ms);
        Err(StoreError::NotSupported { op: "fleet_holds" })
    }
    /// Deletes limit windows that started before `before_window_ms` and holds that expired
    /// before `now_ms`. Returns the rows deleted.
    fn prune_limits(&self, before_window_ms: u64, now_ms: u64) -> Result<u64, StoreError> {
        let _ = (before_window_ms, now_ms);
        Err(StoreError::NotSupported { op: "prune_limits" })
    }
    /// Inserts or replaces a session's entry in the sessions directory (keyed by
    /// `session_id`).
    fn put_session_dir(&self, entry: &SessionDirEntry) -> Result<(), StoreError> {
        let _ = entry;
        Err(StoreError::NotSupported {
            op: "put_session_dir",
        })
    }
    /// A session's directory entry, if it has one.
    fn get_session_dir(&self, session_id: u64) -> Result<Option<SessionDirEntry>, StoreError> {
        let _ = session_id;
        Err(StoreError::NotSupported {
            op: "get_session_dir",
        })
    }
    /// Removes a session's directory entry (the session ended) if `gateway_id` still holds it:
    /// a gateway ending its share of a session that a player resumed through another gateway
    /// must not erase the new gateway's entry. Removing a missing entry, or one another gateway
    /// holds, is not an error (nothing is removed).
    fn remove_session_dir(&self, session_id: u64, gateway_id: &str) -> Result<(), StoreError> {
        let _ = (session_id, gateway_id);
        Err(StoreError::NotSupported {
            op: "remove_session_dir",
        })
    }

    /// The federation's secret, the MAC key of redirect tickets (`ticket.rs`): the stored one,
    /// or else `candidate` (at least 32 random bytes the caller drew), stored first. Get or
    /// create in one statement, so gateways starting together all read the one that won; one
    /// per store, so one per federation.
    fn federation_secret(&self, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        let _ = candidate;
        Err(StoreError::NotSupported {
            op: "federation_secret",
        })
    }

    // ---- The checker's records (issue 14, items 4 and 5; `checker.rs`). Both stores
    // implement them; the defaults only keep test doubles short.

    /// Appends a check record and, in the same transaction, makes it its gateway's vote on the
    /// node unless that gateway's vote is newer (by `at_ms`; a tie goes to this record). Keeps at
    /// most [`MAX_CHECKS_PER_NODE`] records per node, deleting the oldest.
    fn record_check(&self, rec: &CheckRecordRow) -> Result<(), StoreError> {
        let _ = rec;
        Err(StoreError::NotSupported { op: "record_check" })
    }
    /// The node's newest `limit` check records (at most [`MAX_CHECKS_LIST`]), newest first (by
    /// `at_ms`, then by insertion).
    fn checks_of(&self, node_id: &str, limit: usize) -> Result<Vec<CheckRecordRow>, StoreError> {
        let _ = (node_id, limit);
        Err(StoreError::NotSupported { op: "checks_of" })
    }
    /// Each gateway's newest check of the node, ordered by gateway id: what the majority rule
    /// reads. Kept apart from the capped history, so that many checks by one gateway never
    /// push another gateway's vote out.
    fn latest_votes(&self, node_id: &str) -> Result<Vec<CheckVote>, StoreError> {
        let _ = node_id;
        Err(StoreError::NotSupported { op: "latest_votes" })
    }
    /// Deletes check records and votes older than `older_than_ms`. Returns the rows deleted.
    fn prune_checks(&self, older_than_ms: u64) -> Result<u64, StoreError> {
        let _ = older_than_ms;
        Err(StoreError::NotSupported { op: "prune_checks" })
    }
    /// Replaces the node's GPU set with `gpus` atomically (at most [`MAX_GPUS`], each UUID
    /// once, compared in ASCII lowercase), records `gateway_id` as its recorder and
    /// `seen_at_ms` as its liveness, and says how the set of UUIDs compares with the node's
    /// previous record.
    fn record_node_gpus(
        &self,
        node_id: &str,
        gateway_id: &str,
        gpus: &[GpuIdentityRow],
        seen_at_ms: u64,
    ) -> Result<GpuSetChange, StoreError> {
        let _ = (node_id, gateway_id, gpus, seen_at_ms);
        Err(StoreError::NotSupported {
            op: "record_node_gpus",
        })
    }
    /// The node's recorded GPUs, by UUID (lowercase).
    fn node_gpus(&self, node_id: &str) -> Result<Vec<GpuIdentityRow>, StoreError> {
        let _ = node_id;
        Err(StoreError::NotSupported { op: "node_gpus" })
    }
    /// Every node holding one of `uuids` (at most [`MAX_GPUS`], any case) whose GPU set was
    /// seen at or after `live_since_ms`, the asking node included (the caller filters), ordered
    /// by UUID and node id; at most [`checker::MAX_GPU_HOLDERS`] rows.
    fn gpu_uuid_holders(
        &self,
        uuids: &[String],
        live_since_ms: u64,
    ) -> Result<Vec<GpuHolder>, StoreError> {
        let _ = (uuids, live_since_ms);
        Err(StoreError::NotSupported {
            op: "gpu_uuid_holders",
        })
    }
    /// Renews the liveness of the node's GPU set (one row; it never moves back in time).
    /// Returns false when the node has no GPU record.
    fn touch_node_gpus(&self, node_id: &str, seen_at_ms: u64) -> Result<bool, StoreError> {
        let _ = (node_id, seen_at_ms);
        Err(StoreError::NotSupported {
            op: "touch_node_gpus",
        })
    }
    /// Releases the node's GPU identities when it left `gateway_id`, if that gateway recorded
    /// them: the set's liveness moves back to `seen_at_ms` (never forward), so that a holder
    /// query from a later bound no longer finds it, and a node that takes the GPUs over (a
    /// renamed node) is not taken for a clone. The set itself stays, so that a changed GPU set
    /// is still detected when the node comes back, and it is pruned as before. A set another
    /// gateway recorded since (the node moved there) is left alone. Returns whether it was
    /// released.
    fn release_node_gpus(
        &self,
        node_id: &str,
        gateway_id: &str,
        seen_at_ms: u64,
    ) -> Result<bool, StoreError> {
        let _ = (node_id, gateway_id, seen_at_ms);
        Err(StoreError::NotSupported {
            op: "release_node_gpus",
        })
    }
    /// Deletes the GPU sets of nodes not seen since `seen_before_ms` (a node seen again later
    /// is then recorded as first seen). Returns the nodes deleted.
    fn prune_node_gpus(&self, seen_before_ms: u64) -> Result<u64, StoreError> {
        let _ = seen_before_ms;
        Err(StoreError::NotSupported {
            op: "prune_node_gpus",
        })
    }
    /// Saves the node's verification state, unless a newer snapshot (by `at_ms`) is stored.
    fn save_verification(
        &self,
        node_id: &str,
        state: &str,
        reasons_json: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let _ = (node_id, state, reasons_json, at_ms);
        Err(StoreError::NotSupported {
            op: "save_verification",
        })
    }
    /// The node's saved verification state, if any.
    fn load_verification(&self, node_id: &str) -> Result<Option<VerificationSnapshot>, StoreError> {
        let _ = node_id;
        Err(StoreError::NotSupported {
            op: "load_verification",
        })
    }
}

/// SHA-256 of a secret, lowercase hex: what is stored and indexed instead of the secret.
///
/// A fast hash is appropriate here (unlike for passwords) because every secret the store issues
/// carries 256 bits of randomness: brute-forcing a leaked digest is infeasible however cheap one
/// guess is, so a deliberately slow KDF would only add latency to every authentication.
pub fn hash_secret(secret: &str) -> String {
    // Every request's key is hashed: a table lookup per nibble, where `hex::encode`'s
    // char iterator cost about 2,000 instructions.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = String::with_capacity(digest.len() * 2);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// The part of a secret that may be shown in listings: at most 8 characters, and at most a quarter
/// of the secret, so that a short caller-chosen secret (such as `demo`) is not displayed whole.
pub fn secret_display_prefix(secret: &str) -> String {
    let chars = secret.chars().count();
    secret.chars().take((chars / 4).min(8)).collect()
}

/// A fresh secret: `prefix` followed by 32 random bytes in hex. `rand::rng()` is a CSPRNG
/// (ChaCha12) seeded from the operating system.
fn new_secret(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

/// A fresh record id: `prefix` followed by 8 random bytes in hex. Ids are not secrets; randomness
/// only keeps them unguessable in URLs and unique across gateways sharing a database.
fn new_id(prefix: &str) -> String {
    let bytes: [u8; 8] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

/// Checks a name-like field: trimmed, 1..=`max_chars` characters, no control characters.
fn check_name<'a>(
    field: &'static str,
    value: &'a str,
    max_chars: usize,
) -> Result<&'a str, StoreError> {
    let trimmed = value.trim();
    let chars = trimmed.chars().count();
    if chars == 0 {
        return Err(StoreError::Invalid {
            field,
            message: "must not be empty".into(),
        });
    }
    if chars > max_chars {
        return Err(StoreError::Invalid {
            field,
            message: format!("{chars} characters, at most {max_chars} allowed"),
        });
    }
    if trimmed.chars().any(char::is_control) {
        return Err(StoreError::Invalid {
            field,
            message: "must not contain control characters".into(),
        });
    }
    Ok(trimmed)
}

/// Checks a free-text field: at most [`MAX_TEXT_BYTES`] bytes (empty allowed).
fn check_text(field: &'static str, value: &str) -> Result<(), StoreError> {
    if value.len() > MAX_TEXT_BYTES {
        return Err(StoreError::Invalid {
            field,
            message: format!("{} bytes, at most {MAX_TEXT_BYTES} allowed", value.len()),
        });
    }
    Ok(())
}

/// Whether `id` could be a record's id at all: not empty, at most [`MAX_ID_CHARS`] characters
/// and no NUL (which PostgreSQL `TEXT` cannot hold). Lookups answer "not found" for any other
/// without a query.
fn possible_id(id: &str) -> bool {
    !id.contains('\0') && check_id("id", id, false).is_ok()
}

/// Checks an identifier-like field: at most [`MAX_ID_CHARS`] characters (empty allowed only
/// where the caller permits it).
fn check_id(field: &'static str, value: &str, allow_empty: bool) -> Result<(), StoreError> {
    if value.is_empty() && !allow_empty {
        return Err(StoreError::Invalid {
            field,
            message: "must not be empty".into(),
        });
    }
    let chars = value.chars().count();
    if chars > MAX_ID_CHARS {
        return Err(StoreError::Invalid {
            field,
            message: format!("{chars} characters, at most {MAX_ID_CHARS} allowed"),
        });
    }
    Ok(())
}

/// Converts a counter to SQLite's signed 64-bit integer.
fn to_i64(field: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Invalid {
        field,
        message: format!("{value} exceeds the largest storable value {}", i64::MAX),
    })
}

/// Checks a measurement: finite and not negative.
fn check_measure(field: &'static str, value: f64) -> Result<(), StoreError> {
    if !value.is_finite() || value < 0.0 {
        return Err(StoreError::Invalid {
            field,
            message: format!("{value} is not a finite, non-negative number"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_secret_is_the_lowercase_hex_sha256_stored_keys_are_looked_up_by() {
        // FIPS 180-2's "abc" vector, and the hex crate's rendering that stored hashes were
        // written with before the hand-written encoder.
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let s = new_secret(API_KEY_PREFIX);
        assert_eq!(hash_secret(&s), hex::encode(Sha256::digest(s.as_bytes())));
    }

    #[test]
    fn display_prefix_never_shows_a_short_secret_whole() {
        assert_eq!(secret_display_prefix("demo"), "d");
        assert_eq!(secret_display_prefix(""), "");
        let s = new_secret(API_KEY_PREFIX);
        assert_eq!(secret_display_prefix(&s), &s[..8]);
        // Multi-byte characters are counted as characters, never split.
        assert_eq!(secret_display_prefix("ééééééééé"), "éé");
    }

    #[test]
    fn secrets_and_ids_have_their_documented_shape() {
        let s = new_secret(ENROLMENT_TOKEN_PREFIX);
        assert_eq!(s.len(), 4 + 64);
        assert!(s.starts_with("npt_"));
        assert!(s[4..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(s, new_secret(ENROLMENT_TOKEN_PREFIX));
        let id = new_id("op_");
        assert_eq!(id.len(), 3 + 16);
    }

    #[test]
    fn hash_is_sha256_hex() {
        // The SHA-256 of "abc" from FIPS 180-2, appendix B.1.
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn retryable_only_for_busy_and_locked() {
        let busy = StoreError::Sqlite {
            op: "x",
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                None,
            ),
        };
        assert!(busy.is_retryable());
        let full = StoreError::Sqlite {
            op: "x",
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                None,
            ),
        };
        assert!(!full.is_retryable());
        assert!(!StoreError::Closed.is_retryable());
        assert!(StoreError::NotFound {
            kind: "operator",
            id: "op_x".into()
        }
        .is_caller_error());
    }

    #[test]
    fn kyc_and_kind_round_trip_through_strings_and_json() {
        for k in [
            KycStatus::Pending,
            KycStatus::Verified,
            KycStatus::Suspended,
        ] {
            assert_eq!(k.as_str().parse::<KycStatus>().ok(), Some(k));
            assert_eq!(
                serde_json::to_string(&k).ok(),
                Some(format!("\"{}\"", k.as_str()))
            );
        }
        assert!("Verified".parse::<KycStatus>().is_err());
        for k in [UsageKind::Inference, UsageKind::Game] {
            assert_eq!(k.as_str().parse::<UsageKind>().ok(), Some(k));
        }
    }
}
