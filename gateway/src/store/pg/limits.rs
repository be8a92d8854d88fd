//! Fleet-wide limits on PostgreSQL (issue 13, item 4): the shared per-minute counters gateways
//! lease slices of, and the concurrency holds each gateway publishes with an expiry.
//!
//! Every write is one statement in its own transaction: a lease is a single conditional
//! `INSERT ... ON CONFLICT DO UPDATE ... RETURNING`, which PostgreSQL (and CockroachDB) apply
//! atomically to the row as it is when the write locks it, so concurrent gateways can never be
//! granted more than the limit together; no advisory locks, no explicit row locks.

use super::{pg_err, PgStore, Retry};
use crate::store::{check_holds, check_id, check_lease, FleetHold, StoreError};

/// The tables, as one migration (appended to [`super::MIGRATIONS`]).
pub(crate) const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS limit_windows (
    key_id           TEXT NOT NULL,
    pool             TEXT NOT NULL,
    window_start_ms  BIGINT NOT NULL,
    used             BIGINT NOT NULL,
    last_grant       BIGINT NOT NULL,
    PRIMARY KEY (key_id, pool, window_start_ms)
);
CREATE TABLE IF NOT EXISTS limit_holds (
    gateway_id     TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    pool           TEXT NOT NULL,
    held           BIGINT NOT NULL,
    expires_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (key_id, pool, gateway_id)
);
";

/// The lease: the grant is computed from the locked row, so it never takes `used` past the
/// limit; SET expressions read the old row, so `last_grant` is this statement's grant.
const LEASE_SQL: &str = "
INSERT INTO limit_windows AS w (key_id, pool, window_start_ms, used, last_grant)
VALUES ($1, $2, $3, LEAST($4::BIGINT, $5::BIGINT), LEAST($4::BIGINT, $5::BIGINT))
ON CONFLICT (key_id, pool, window_start_ms) DO UPDATE SET
    used = w.used + LEAST($4::BIGINT, GREATEST($5::BIGINT - w.used, 0)),
    last_grant = LEAST($4::BIGINT, GREATEST($5::BIGINT - w.used, 0))
RETURNING last_grant";

impl PgStore {
    pub(crate) fn pg_lease_units(
        &self,
        key_id: &str,
        pool: &str,
        window_start_ms: u64,
        want: u64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        let (window, want, limit) = check_lease(key_id, pool, window_start_ms, want, limit)?;
        // Retried only when PostgreSQL says it rolled back: a lease repeated after a commit
        // whose answer was lost would count units nobody uses (fewer admissions, never more).
        let granted: i64 = self.run(Retry::IfRolledBack, |conn| {
            let row = conn
                .query_one(LEASE_SQL, &[&key_id, &pool, &window, &want, &limit])
                .map_err(pg_err("lease limit units"))?;
            Ok(row.get(0))
        })?;
        Ok(u64::try_from(granted).unwrap_or(0))
    }

    pub(crate) fn pg_publish_holds(
        &self,
        gateway_id: &str,
        holds: &[FleetHold],
    ) -> Result<(), StoreError> {
        check_holds(gateway_id, holds)?;
        // Absolute figures: writing them twice is writing them once.
        self.run(Retry::Idempotent, |conn| {
            let mut tx = conn.transaction().map_err(pg_err("begin publish holds"))?;
            for h in holds {
                let (held, expires) = (h.held as i64, h.expires_at_ms as i64);
                if h.held == 0 {
                    tx.execute(
                        "DELETE FROM limit_holds WHERE key_id = $1 AND pool = $2 AND gateway_id = $3",
                        &[&h.key_id, &h.pool, &gateway_id],
                    )
                    .map_err(pg_err("publish holds"))?;
                } else {
                    tx.execute(
                        "INSERT INTO limit_holds (gateway_id, key_id, pool, held, expires_at_ms) \
                         VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (key_id, pool, gateway_id) DO UPDATE SET \
                         held = excluded.held, expires_at_ms = excluded.expires_at_ms",
                        &[&gateway_id, &h.key_id, &h.pool, &held, &expires],
                    )
                    .map_err(pg_err("publish holds"))?;
                }
            }
            tx.commit().map_err(pg_err("commit publish holds"))
        })
    }

    pub(crate) fn pg_fleet_holds(
        &self,
        key_id: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<FleetHold>, StoreError> {
        if let Some(k) = key_id {
            check_id("key_id", k, false)?;
        }
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        self.run(Retry::Idempotent, |conn| {
            let rows = conn
                .query(
                    "SELECT gateway_id, key_id, pool, held, expires_at_ms FROM limit_holds \
                     WHERE expires_at_ms > $1 AND ($2::TEXT IS NULL OR key_id = $2) \
                     ORDER BY key_id, pool, gateway_id",
                    &[&now, &key_id],
                )
                .map_err(pg_err("list fleet holds"))?;
            Ok(rows
                .iter()
                .map(|r| FleetHold {
                    gateway_id: r.get(0),
                    key_id: r.get(1),
                    pool: r.get(2),
                    held: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                    expires_at_ms: u64::try_from(r.get::<_, i64>(4)).unwrap_or(0),
                })
                .collect())
        })
    }

    pub(crate) fn pg_prune_limits(
        &self,
        before_window_ms: u64,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let before = i64::try_from(before_window_ms).unwrap_or(i64::MAX);
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        self.run(Retry::Idempotent, |conn| {
            let windows = conn
                .execute(
                    "DELETE FROM limit_windows WHERE window_start_ms < $1",
                    &[&before],
                )
                .map_err(pg_err("prune limit windows"))?;
            let holds = conn
                .execute("DELETE FROM limit_holds WHERE expires_at_ms <= $1", &[&now])
                .map_err(pg_err("prune limit holds"))?;
            Ok(windows + holds)
        })
    }
}
