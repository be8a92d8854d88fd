//! The checker's records on PostgreSQL (tables `check_records`, `check_votes`,
//! `node_gpu_sets`, `node_gpus` and `node_verification`; see `store/checker.rs`). Portable to
//! CockroachDB: upserts with a `WHERE` deciding which write wins, `= ANY` of a typed array,
//! `SELECT ... FOR UPDATE`, `OFFSET` in a subquery; no advisory locks.
//!
//! Retries: appending a check record and recording a GPU set are not idempotent (a record
//! would be appended twice; a set recorded again would answer "unchanged" after a change), so
//! they are retried only when PostgreSQL reports the attempt rolled back; the rest are
//! idempotent (reads, upserts to absolute values guarded by time, deletes by bound).

use ::postgres::Row;

use super::super::checker::{
    check_gpu_report, check_node_id, check_record, check_uuid_query, check_verification,
    checks_limit, MAX_CHECKS_PER_NODE, MAX_GPU_HOLDERS,
};
use super::super::{
    CheckRecordRow, CheckVote, GpuHolder, GpuIdentityRow, GpuSetChange, VerificationSnapshot,
};
use super::{col, col_u64, pg_err, query_map, saturating_i64, to_i64, PgStore, Retry, StoreError};

/// The tables (appended to `MIGRATIONS`; self-contained).
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE IF NOT EXISTS check_records (
    id           BIGSERIAL PRIMARY KEY,
    node_id      TEXT NOT NULL,
    gateway_id   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    state        TEXT NOT NULL,
    detail_json  TEXT NOT NULL,
    at_ms        BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS check_records_by_node ON check_records (node_id, at_ms, id);
CREATE INDEX IF NOT EXISTS check_records_by_time ON check_records (at_ms);
CREATE TABLE IF NOT EXISTS check_votes (
    node_id     TEXT NOT NULL,
    gateway_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    PRIMARY KEY (node_id, gateway_id)
);
CREATE INDEX IF NOT EXISTS check_votes_by_time ON check_votes (at_ms);
CREATE TABLE IF NOT EXISTS node_gpu_sets (
    node_id           TEXT PRIMARY KEY,
    gateway_id        TEXT NOT NULL,
    first_seen_at_ms  BIGINT NOT NULL,
    changed_at_ms     BIGINT NOT NULL,
    seen_at_ms        BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS node_gpus (
    node_id         TEXT NOT NULL,
    uuid            TEXT NOT NULL,
    pci_device_id   BIGINT NOT NULL,
    driver_version  TEXT NOT NULL,
    model           TEXT NOT NULL,
    PRIMARY KEY (node_id, uuid)
);
CREATE INDEX IF NOT EXISTS node_gpus_by_uuid ON node_gpus (uuid);
CREATE TABLE IF NOT EXISTS node_verification (
    node_id       TEXT PRIMARY KEY,
    state         TEXT NOT NULL,
    reasons_json  TEXT NOT NULL,
    at_ms         BIGINT NOT NULL
);
"#;

const CHECK_COLS: &str = "node_id, gateway_id, kind, state, detail_json, at_ms";

fn check_from_row(r: &Row) -> Result<CheckRecordRow, StoreError> {
    let op = "read check record";
    Ok(CheckRecordRow {
        node_id: col(r, 0, op)?,
        gateway_id: col(r, 1, op)?,
        kind: col(r, 2, op)?,
        state: col(r, 3, op)?,
        detail_json: col(r, 4, op)?,
        at_ms: col_u64(r, 5, op)?,
    })
}

impl PgStore {
    pub(crate) fn chk_record(&self, rec: &CheckRecordRow) -> Result<(), StoreError> {
        let at = check_record(rec)?;
        let cap = MAX_CHECKS_PER_NODE as i64;
        self.run(Retry::IfRolledBack, |conn| {
            let mut tx = conn.transaction().map_err(pg_err("begin record check"))?;
            tx.execute(
                &format!(
                    "INSERT INTO check_records ({CHECK_COLS}) VALUES ($1, $2, $3, $4, $5, $6)"
                ),
                &[
                    &rec.node_id,
                    &rec.gateway_id,
                    &rec.kind,
                    &rec.state,
                    &rec.detail_json,
                    &at,
                ],
            )
            .map_err(pg_err("insert check record"))?;
            tx.execute(
                "INSERT INTO check_votes (node_id, gateway_id, kind, state, at_ms) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (node_id, gateway_id) DO UPDATE SET kind = excluded.kind, \
                 state = excluded.state, at_ms = excluded.at_ms \
                 WHERE check_votes.at_ms <= excluded.at_ms",
                &[&rec.node_id, &rec.gateway_id, &rec.kind, &rec.state, &at],
            )
            .map_err(pg_err("update check vote"))?;
            // The cap: whatever lies past the newest MAX_CHECKS_PER_NODE goes.
            tx.execute(
                "DELETE FROM check_records WHERE node_id = $1 AND id IN (\
                   SELECT id FROM check_records WHERE node_id = $1 \
                   ORDER BY at_ms DESC, id DESC OFFSET $2)",
                &[&rec.node_id, &cap],
            )
            .map_err(pg_err("cap check records"))?;
            tx.commit().map_err(pg_err("commit check record"))
        })
    }

    pub(crate) fn chk_list(
        &self,
        node_id: &str,
        limit: usize,
    ) -> Result<Vec<CheckRecordRow>, StoreError> {
        check_node_id(node_id)?;
        let limit = checks_limit(limit);
        self.run(Retry::Idempotent, |conn| {
            query_map(
                &mut **conn,
                &format!(
                    "SELECT {CHECK_COLS} FROM check_records WHERE node_id = $1 \
                     ORDER BY at_ms DESC, id DESC LIMIT $2"
                ),
                &[&node_id, &limit],
                "list check records",
                check_from_row,
            )
        })
    }

    pub(crate) fn chk_votes(&self, node_id: &str) -> Result<Vec<CheckVote>, StoreError> {
        check_node_id(node_id)?;
        self.run(Retry::Idempotent, |conn| {
            query_map(
                &mut **conn,
                "SELECT gateway_id, kind, state, at_ms FROM check_votes WHERE node_id = $1 \
                 ORDER BY gateway_id",
                &[&node_id],
                "list check votes",
                |r| {
                    let op = "read check vote";
                    Ok(CheckVote {
                        gateway_id: col(r, 0, op)?,
                        kind: col(r, 1, op)?,
                        state: col(r, 2, op)?,
                        at_ms: col_u64(r, 3, op)?,
                    })
                },
            )
        })
    }

    pub(crate) fn chk_prune(&self, older_than_ms: u64) -> Result<u64, StoreError> {
        let before = saturating_i64(older_than_ms);
        self.run(Retry::Idempotent, |conn| {
            let mut tx = conn.transaction().map_err(pg_err("begin prune checks"))?;
            let records = tx
                .execute("DELETE FROM check_records WHERE at_ms < $1", &[&before])
                .map_err(pg_err("prune check records"))?;
            let votes = tx
                .execute("DELETE FROM check_votes WHERE at_ms < $1", &[&before])
                .map_err(pg_err("prune check votes"))?;
            tx.commit().map_err(pg_err("commit prune checks"))?;
            Ok(records + votes)
        })
    }

    pub(crate) fn gpu_record(
        &self,
        node_id: &str,
        gateway_id: &str,
        gpus: &[GpuIdentityRow],
        seen_at_ms: u64,
    ) -> Result<GpuSetChange, StoreError> {
        let report = check_gpu_report(node_id, gateway_id, gpus, seen_at_ms)?;
        let now = report.seen_at_ms;
        let current = report.uuids();
        let pci: Vec<i64> = report
            .gpus
            .iter()
            .map(|g| i64::from(g.pci_device_id))
            .collect();
        let drivers: Vec<String> = report
            .gpus
            .iter()
            .map(|g| g.driver_version.clone())
            .collect();
        let models: Vec<String> = report.gpus.iter().map(|g| g.model.clone()).collect();
        self.run(Retry::IfRolledBack, |conn| {
            let mut tx = conn
                .transaction()
                .map_err(pg_err("begin record node gpus"))?;
            // Insert-or-lock the node's set row first: a concurrent record of the same node
            // waits here until this one commits, and then compares with what this one wrote.
            let first_seen = tx
                .query_opt(
                    "INSERT INTO node_gpu_sets (node_id, gateway_id, first_seen_at_ms, \
                     changed_at_ms, seen_at_ms) VALUES ($1, $2, $3, $3, $3) \
                     ON CONFLICT (node_id) DO NOTHING RETURNING node_id",
                    &[&node_id, &gateway_id, &now],
                )
                .map_err(pg_err("record node gpu set"))?
                .is_some();
            if !first_seen {
                tx.query_one(
                    "SELECT node_id FROM node_gpu_sets WHERE node_id = $1 FOR UPDATE",
                    &[&node_id],
                )
                .map_err(pg_err("lock node gpu set"))?;
            }
            let previous: Vec<String> = tx
                .query(
                    "SELECT uuid FROM node_gpus WHERE node_id = $1 ORDER BY uuid",
                    &[&node_id],
                )
                .map_err(pg_err("read node gpus"))?
                .iter()
                .map(|r| col(r, 0, "read node gpus"))
                .collect::<Result<_, _>>()?;
            let changed = !first_seen && previous != current;
            tx.execute("DELETE FROM node_gpus WHERE node_id = $1", &[&node_id])
                .map_err(pg_err("replace node gpus"))?;
            if !current.is_empty() {
                tx.execute(
                    "INSERT INTO node_gpus (node_id, uuid, pci_device_id, driver_version, model) \
                     SELECT $1::TEXT, * FROM UNNEST($2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[])",
                    &[&node_id, &current, &pci, &drivers, &models],
                )
                .map_err(pg_err("insert node gpus"))?;
            }
            if !first_seen {
                tx.execute(
                    "UPDATE node_gpu_sets SET gateway_id = $2, seen_at_ms = $3, \
                     changed_at_ms = CASE WHEN $4::BOOLEAN THEN $3 ELSE changed_at_ms END \
                     WHERE node_id = $1",
                    &[&node_id, &gateway_id, &now, &changed],
                )
                .map_err(pg_err("record node gpu set"))?;
            }
            tx.commit().map_err(pg_err("commit node gpus"))?;
            Ok(GpuSetChange {
                changed,
                previous,
                first_seen,
            })
        })
    }

    pub(crate) fn gpu_list(&self, node_id: &str) -> Result<Vec<GpuIdentityRow>, StoreError> {
        check_node_id(node_id)?;
        self.run(Retry::Idempotent, |conn| {
            query_map(
                &mut **conn,
                "SELECT uuid, pci_device_id, driver_version, model FROM node_gpus \
                 WHERE node_id = $1 ORDER BY uuid",
                &[&node_id],
                "list node gpus",
                |r| {
                    let op = "read node gpu";
                    Ok(GpuIdentityRow {
                        uuid: col(r, 0, op)?,
                        pci_device_id: u32::try_from(col::<i64>(r, 1, op)?).unwrap_or(0),
                        driver_version: col(r, 2, op)?,
                        model: col(r, 3, op)?,
                    })
                },
            )
        })
    }

    pub(crate) fn gpu_holders(
        &self,
        uuids: &[String],
        live_since_ms: u64,
    ) -> Result<Vec<GpuHolder>, StoreError> {
        let uuids = check_uuid_query(uuids)?;
        if uuids.is_empty() {
            return Ok(Vec::new());
        }
        let since = saturating_i64(live_since_ms);
        let limit = MAX_GPU_HOLDERS as i64;
        self.run(Retry::Idempotent, |conn| {
            query_map(
                &mut **conn,
                "SELECT g.uuid, g.node_id, s.gateway_id, s.seen_at_ms FROM node_gpus g \
                 JOIN node_gpu_sets s ON s.node_id = g.node_id \
                 WHERE s.seen_at_ms >= $1 AND g.uuid = ANY($2::TEXT[]) \
                 ORDER BY g.uuid, g.node_id LIMIT $3",
                &[&since, &uuids, &limit],
                "list gpu uuid holders",
                |r| {
                    let op = "read gpu uuid holder";
                    Ok(GpuHolder {
                        uuid: col(r, 0, op)?,
                        node_id: col(r, 1, op)?,
                        gateway_id: col(r, 2, op)?,
                        seen_at_ms: col_u64(r, 3, op)?,
                    })
                },
            )
        })
    }

    pub(crate) fn gpu_touch(&self, node_id: &str, seen_at_ms: u64) -> Result<bool, StoreError> {
        check_node_id(node_id)?;
        let seen = to_i64("seen_at_ms", seen_at_ms)?;
        let found = self.run(Retry::Idempotent, |conn| {
            conn.execute(
                "UPDATE node_gpu_sets SET seen_at_ms = GREATEST(seen_at_ms, $2) \
                 WHERE node_id = $1",
                &[&node_id, &seen],
            )
            .map_err(pg_err("touch node gpus"))
        })?;
        Ok(found > 0)
    }

    pub(crate) fn gpu_release(
        &self,
        node_id: &str,
        gateway_id: &str,
        seen_at_ms: u64,
    ) -> Result<bool, StoreError> {
        check_node_id(node_id)?;
        let seen = to_i64("seen_at_ms", seen_at_ms)?;
        // Only the gateway that recorded the set releases it: the node may have moved on.
        let found = self.run(Retry::Idempotent, |conn| {
            conn.execute(
                "UPDATE node_gpu_sets SET seen_at_ms = LEAST(seen_at_ms, $3) \
                 WHERE node_id = $1 AND gateway_id = $2",
                &[&node_id, &gateway_id, &seen],
            )
            .map_err(pg_err("release node gpus"))
        })?;
        Ok(found > 0)
    }

    pub(crate) fn gpu_prune(&self, seen_before_ms: u64) -> Result<u64, StoreError> {
        let before = saturating_i64(seen_before_ms);
        self.run(Retry::Idempotent, |conn| {
            let mut tx = conn
                .transaction()
                .map_err(pg_err("begin prune node gpus"))?;
            tx.execute(
                "DELETE FROM node_gpus WHERE node_id IN \
                 (SELECT node_id FROM node_gpu_sets WHERE seen_at_ms < $1)",
                &[&before],
            )
            .map_err(pg_err("prune node gpus"))?;
            let sets = tx
                .execute(
                    "DELETE FROM node_gpu_sets WHERE seen_at_ms < $1",
                    &[&before],
                )
                .map_err(pg_err("prune node gpu sets"))?;
            tx.commit().map_err(pg_err("commit prune node gpus"))?;
            Ok(sets)
        })
    }

    pub(crate) fn ver_save(
        &self,
        node_id: &str,
        state: &str,
        reasons_json: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let at = check_verification(node_id, state, reasons_json, at_ms)?;
        self.run(Retry::Idempotent, |conn| {
            conn.execute(
                "INSERT INTO node_verification (node_id, state, reasons_json, at_ms) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (node_id) DO UPDATE SET state = excluded.state, \
                 reasons_json = excluded.reasons_json, at_ms = excluded.at_ms \
                 WHERE node_verification.at_ms <= excluded.at_ms",
                &[&node_id, &state, &reasons_json, &at],
            )
            .map_err(pg_err("save verification"))?;
            Ok(())
        })
    }

    pub(crate) fn ver_load(
        &self,
        node_id: &str,
    ) -> Result<Option<VerificationSnapshot>, StoreError> {
        check_node_id(node_id)?;
        self.run(Retry::Idempotent, |conn| {
            let row = conn
                .query_opt(
                    "SELECT node_id, state, reasons_json, at_ms FROM node_verification \
                     WHERE node_id = $1",
                    &[&node_id],
                )
                .map_err(pg_err("load verification"))?;
            row.map(|r| {
                let op = "read verification";
                Ok(VerificationSnapshot {
                    node_id: col(&r, 0, op)?,
                    state: col(&r, 1, op)?,
                    reasons_json: col(&r, 2, op)?,
                    at_ms: col_u64(&r, 3, op)?,
                })
            })
            .transpose()
        })
    }
}
