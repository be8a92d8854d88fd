//! The PostgreSQL store: the same [`Store`] as [`super::SqliteStore`], for several regional
//! gateways sharing one database (issue 13, "Regional gateways").
//!
//! Built on the synchronous `postgres` driver (sfackler's, over tokio-postgres) with an `r2d2`
//! connection pool: the [`Store`] trait is synchronous and the gateway already calls it from
//! `spawn_blocking`, so a blocking driver fits without a second async runtime in the call path.
//!
//! # Portability
//! The SQL is kept portable to CockroachDB: no advisory locks, no PostgreSQL-only extensions, no
//! `LISTEN/NOTIFY` on hot paths. What it relies on: `INSERT ... ON CONFLICT ... DO UPDATE`,
//! `RETURNING`, `BIGINT`/`DOUBLE PRECISION`/`TEXT`/`BOOLEAN` columns, and transactions at the
//! default isolation level (serialization failures are retryable errors).
//!
//! # Migrations
//! `MIGRATIONS[i]` takes the schema from version i to i + 1 (table `nearpath_schema`). Append,
//! never edit. Gateways starting together race to migrate: the version row is locked with
//! `SELECT ... FOR UPDATE` inside the migrating transaction, so exactly one applies each step.

mod directory;

use super::*;
use ::postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;
use std::time::Duration;

/// A pooled connection.
pub type PgConn = r2d2::PooledConnection<PostgresConnectionManager<NoTls>>;

/// Schema migrations, oldest first. Append, never edit.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the base schema (operators, tokens, keys, node ids, SLA, penalties, GPU models, usage).
    // (filled in by the PostgreSQL store work)
    "SELECT 1",
    // 2 (issue 13, gateway and node directories): see `directory.rs`.
    directory::MIGRATION,
];

/// The newest schema version this build knows.
pub const PG_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The PostgreSQL-backed [`Store`].
pub struct PgStore {
    pool: r2d2::Pool<PostgresConnectionManager<NoTls>>,
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

impl PgStore {
    /// Connects (a pool of `pool_size`), and migrates the schema to [`PG_SCHEMA_VERSION`].
    pub fn open(url: &str, pool_size: u32, connect_timeout: Duration) -> Result<PgStore, StoreError> {
        let config: ::postgres::Config = url.parse().map_err(|e| StoreError::Invalid {
            field: "store.url",
            message: format!("{e}"),
        })?;
        let manager = PostgresConnectionManager::new(config, NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(pool_size.max(1))
            .connection_timeout(connect_timeout)
            .build(manager)
            .map_err(|e| StoreError::Unavailable {
                message: e.to_string(),
            })?;
        let store = PgStore { pool };
        store.migrate()?;
        Ok(store)
    }

    /// A connection from the pool, waiting up to the connect timeout.
    pub(crate) fn conn(&self) -> Result<PgConn, StoreError> {
        self.pool.get().map_err(|e| StoreError::Unavailable {
            message: e.to_string(),
        })
    }

    fn migrate(&self) -> Result<(), StoreError> {
        // Filled in by the PostgreSQL store work.
        let _ = self.conn()?;
        Ok(())
    }
}

#[allow(dead_code)] // Used by the queries the PostgreSQL store work adds.
/// Maps a driver error to [`StoreError::Postgres`] naming the operation.
pub(crate) fn pg_err(op: &'static str) -> impl FnOnce(::postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { op, source }
}

fn todo_op(op: &'static str) -> StoreError {
    StoreError::NotSupported { op }
}

impl Store for PgStore {
    fn create_operator(&self, _name: &str, _kyc: KycStatus) -> Result<Operator, StoreError> {
        Err(todo_op("create_operator"))
    }
    fn get_operator(&self, _id: &str) -> Result<Option<Operator>, StoreError> {
        Err(todo_op("get_operator"))
    }
    fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        Err(todo_op("list_operators"))
    }
    fn set_operator_kyc(&self, _id: &str, _status: KycStatus) -> Result<Operator, StoreError> {
        Err(todo_op("set_operator_kyc"))
    }
    fn create_enrolment_token(
        &self,
        _operator_id: &str,
    ) -> Result<(EnrolmentToken, String), StoreError> {
        Err(todo_op("create_enrolment_token"))
    }
    fn authenticate_enrolment_token(
        &self,
        _secret: &str,
    ) -> Result<Option<(Operator, EnrolmentToken)>, StoreError> {
        Err(todo_op("authenticate_enrolment_token"))
    }
    fn revoke_enrolment_token(&self, _id: &str) -> Result<(), StoreError> {
        Err(todo_op("revoke_enrolment_token"))
    }
    fn list_enrolment_tokens(&self, _operator_id: &str) -> Result<Vec<EnrolmentToken>, StoreError> {
        Err(todo_op("list_enrolment_tokens"))
    }
    fn create_api_key(
        &self,
        _tenant: &str,
        _requests_per_minute: u32,
        _tokens_per_minute: u32,
    ) -> Result<(ApiKey, String), StoreError> {
        Err(todo_op("create_api_key"))
    }
    fn insert_api_key_secret(
        &self,
        _secret: &str,
        _tenant: &str,
        _requests_per_minute: u32,
        _tokens_per_minute: u32,
    ) -> Result<ApiKey, StoreError> {
        Err(todo_op("insert_api_key_secret"))
    }
    fn authenticate_api_key(&self, _secret: &str) -> Result<Option<ApiKey>, StoreError> {
        Err(todo_op("authenticate_api_key"))
    }
    fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        Err(todo_op("list_api_keys"))
    }
    fn revoke_api_key(&self, _id: &str) -> Result<(), StoreError> {
        Err(todo_op("revoke_api_key"))
    }
    fn update_api_key(&self, _id: &str, _update: ApiKeyUpdate) -> Result<ApiKey, StoreError> {
        Err(todo_op("update_api_key"))
    }
    fn claim_node_id(
        &self,
        _node_id: &str,
        _operator_id: &str,
        _at_ms: u64,
    ) -> Result<String, StoreError> {
        Err(todo_op("claim_node_id"))
    }
    fn node_owner(&self, _node_id: &str) -> Result<Option<String>, StoreError> {
        Err(todo_op("node_owner"))
    }
    fn sla_apply(
        &self,
        _node_id: &str,
        _operator_id: &str,
        _delta: SlaDelta,
    ) -> Result<SlaRecord, StoreError> {
        Err(todo_op("sla_apply"))
    }
    fn sla_get(&self, _operator_id: &str, _node_id: &str) -> Result<Option<SlaRecord>, StoreError> {
        Err(todo_op("sla_get"))
    }
    fn sla_list(&self) -> Result<Vec<SlaRecord>, StoreError> {
        Err(todo_op("sla_list"))
    }
    fn record_penalty(
        &self,
        _node_id: &str,
        _operator_id: &str,
        _at_ms: u64,
        _kind: &str,
        _active_sessions: u32,
        _detail: &str,
    ) -> Result<PenaltyEvent, StoreError> {
        Err(todo_op("record_penalty"))
    }
    fn list_penalties(
        &self,
        _node_id: Option<&str>,
        _limit: usize,
    ) -> Result<Vec<PenaltyEvent>, StoreError> {
        Err(todo_op("list_penalties"))
    }
    fn penalties_since(
        &self,
        _operator_id: &str,
        _node_id: &str,
        _since_ms: u64,
    ) -> Result<u64, StoreError> {
        Err(todo_op("penalties_since"))
    }
    fn gpu_model_class(&self, _model_key: &str) -> Result<Option<String>, StoreError> {
        Err(todo_op("gpu_model_class"))
    }
    fn note_unclassified_gpu_model(
        &self,
        _model_key: &str,
        _example: &str,
        _at_ms: u64,
    ) -> Result<(), StoreError> {
        Err(todo_op("note_unclassified_gpu_model"))
    }
    fn set_gpu_model_class(
        &self,
        _model_key: &str,
        _example: &str,
        _class: &str,
        _at_ms: u64,
    ) -> Result<GpuModelRecord, StoreError> {
        Err(todo_op("set_gpu_model_class"))
    }
    fn list_gpu_models(&self) -> Result<Vec<GpuModelRecord>, StoreError> {
        Err(todo_op("list_gpu_models"))
    }
    fn append_usage(&self, _record: UsageRecord) -> Result<i64, StoreError> {
        Err(todo_op("append_usage"))
    }
    fn update_usage(&self, _id: i64, _record: UsageRecord) -> Result<i64, StoreError> {
        Err(todo_op("update_usage"))
    }
    fn usage_summary(&self, _since_ms: Option<u64>) -> Result<UsageSummary, StoreError> {
        Err(todo_op("usage_summary"))
    }
    fn list_usage(&self, _limit: usize) -> Result<Vec<UsageRecord>, StoreError> {
        Err(todo_op("list_usage"))
    }
    fn key_usage_by_day(
        &self,
        _api_key_id: Option<&str>,
        _from_ms: u64,
        _to_ms: u64,
    ) -> Result<Vec<KeyDayUsage>, StoreError> {
        Err(todo_op("key_usage_by_day"))
    }
    // ---- Federation: each feature adds its overrides below, delegating to an inherent
    // method in its own file under `store/pg/`.
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
}
