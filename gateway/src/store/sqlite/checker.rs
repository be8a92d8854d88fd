//! The checker's records on SQLite (tables `check_records`, `check_votes`, `node_gpu_sets`,
//! `node_gpus` and `node_verification`; see `store/checker.rs`). Every write is one IMMEDIATE
//! transaction on the main connection, so a GPU set is replaced, and a record joined by its
//! vote and its retention, all or nothing.

use rusqlite::{params, params_from_iter, OptionalExtension, Row, TransactionBehavior};

use super::super::checker::{
    check_gpu_report, check_node_id, check_record, check_uuid_query, check_verification,
    checks_limit, MAX_CHECKS_PER_NODE, MAX_GPU_HOLDERS,
};
use super::super::{
    CheckRecordRow, CheckVote, GpuHolder, GpuIdentityRow, GpuSetChange, StoreError,
    VerificationSnapshot,
};
use super::{get_u64, query_all, saturating_i64, OpExt, SqliteStore};

/// The tables (appended to `MIGRATIONS`; self-contained, so it applies whatever its number).
pub(super) const MIGRATION: &str = r#"
CREATE TABLE IF NOT EXISTS check_records (
    id           INTEGER PRIMARY KEY,
    node_id      TEXT NOT NULL,
    gateway_id   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    state        TEXT NOT NULL,
    detail_json  TEXT NOT NULL,
    at_ms        INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS check_records_by_node ON check_records (node_id, at_ms, id);
CREATE INDEX IF NOT EXISTS check_records_by_time ON check_records (at_ms);
CREATE TABLE IF NOT EXISTS check_votes (
    node_id     TEXT NOT NULL,
    gateway_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    PRIMARY KEY (node_id, gateway_id)
) STRICT;
CREATE INDEX IF NOT EXISTS check_votes_by_time ON check_votes (at_ms);
CREATE TABLE IF NOT EXISTS node_gpu_sets (
    node_id           TEXT PRIMARY KEY,
    gateway_id        TEXT NOT NULL,
    first_seen_at_ms  INTEGER NOT NULL,
    changed_at_ms     INTEGER NOT NULL,
    seen_at_ms        INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS node_gpus (
    node_id         TEXT NOT NULL,
    uuid            TEXT NOT NULL,
    pci_device_id   INTEGER NOT NULL,
    driver_version  TEXT NOT NULL,
    model           TEXT NOT NULL,
    PRIMARY KEY (node_id, uuid)
) STRICT;
CREATE INDEX IF NOT EXISTS node_gpus_by_uuid ON node_gpus (uuid);
CREATE TABLE IF NOT EXISTS node_verification (
    node_id       TEXT PRIMARY KEY,
    state         TEXT NOT NULL,
    reasons_json  TEXT NOT NULL,
    at_ms         INTEGER NOT NULL
) STRICT;
"#;

const CHECK_COLS: &str = "node_id, gateway_id, kind, state, detail_json, at_ms";

fn check_from_row(r: &Row<'_>) -> rusqlite::Result<CheckRecordRow> {
    Ok(CheckRecordRow {
        node_id: r.get(0)?,
        gateway_id: r.get(1)?,
        kind: r.get(2)?,
        state: r.get(3)?,
        detail_json: r.get(4)?,
        at_ms: get_u64(r, 5)?,
    })
}

fn u32_col(r: &Row<'_>, idx: usize) -> rusqlite::Result<u32> {
    let v: i64 = r.get(idx)?;
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

impl SqliteStore {
    pub(super) fn chk_record(&self, rec: &CheckRecordRow) -> Result<(), StoreError> {
        let at = check_record(rec)?;
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin record check")?;
        tx.prepare_cached(&format!(
            "INSERT INTO check_records ({CHECK_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
        ))
        .and_then(|mut s| {
            s.execute(params![
                rec.node_id,
                rec.gateway_id,
                rec.kind,
                rec.state,
                rec.detail_json,
                at
            ])
        })
        .op("insert check record")?;
        tx.prepare_cached(
            "INSERT INTO check_votes (node_id, gateway_id, kind, state, at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (node_id, gateway_id) DO UPDATE SET kind = excluded.kind, \
             state = excluded.state, at_ms = excluded.at_ms \
             WHERE check_votes.at_ms <= excluded.at_ms",
        )
        .and_then(|mut s| {
            s.execute(params![
                rec.node_id,
                rec.gateway_id,
                rec.kind,
                rec.state,
                at
            ])
        })
        .op("update check vote")?;
        // The cap: whatever lies past the newest MAX_CHECKS_PER_NODE goes (an index range of
        // at most that many entries per insert).
        tx.prepare_cached(
            "DELETE FROM check_records WHERE node_id = ?1 AND id IN (\
               SELECT id FROM check_records WHERE node_id = ?1 \
               ORDER BY at_ms DESC, id DESC LIMIT -1 OFFSET ?2)",
        )
        .and_then(|mut s| s.execute(params![rec.node_id, MAX_CHECKS_PER_NODE as i64]))
        .op("cap check records")?;
        tx.commit().op("commit check record")
    }

    pub(super) fn chk_list(
        &self,
        node_id: &str,
        limit: usize,
    ) -> Result<Vec<CheckRecordRow>, StoreError> {
        check_node_id(node_id)?;
        query_all(
            &self.conn(),
            &format!(
                "SELECT {CHECK_COLS} FROM check_records WHERE node_id = ?1 \
                 ORDER BY at_ms DESC, id DESC LIMIT ?2"
            ),
            params![node_id, checks_limit(limit)],
            check_from_row,
            "list check records",
        )
    }

    pub(super) fn chk_votes(&self, node_id: &str) -> Result<Vec<CheckVote>, StoreError> {
        check_node_id(node_id)?;
        query_all(
            &self.conn(),
            "SELECT gateway_id, kind, state, at_ms FROM check_votes WHERE node_id = ?1 \
             ORDER BY gateway_id",
            [node_id],
            |r| {
                Ok(CheckVote {
                    gateway_id: r.get(0)?,
                    kind: r.get(1)?,
                    state: r.get(2)?,
                    at_ms: get_u64(r, 3)?,
                })
            },
            "list check votes",
        )
    }

    pub(super) fn chk_prune(&self, older_than_ms: u64) -> Result<u64, StoreError> {
        let before = saturating_i64(older_than_ms);
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin prune checks")?;
        let records = tx
            .execute("DELETE FROM check_records WHERE at_ms < ?1", [before])
            .op("prune check records")?;
        let votes = tx
            .execute("DELETE FROM check_votes WHERE at_ms < ?1", [before])
            .op("prune check votes")?;
        tx.commit().op("commit prune checks")?;
        Ok((records + votes) as u64)
    }

    pub(super) fn gpu_record(
        &self,
        node_id: &str,
        gateway_id: &str,
        gpus: &[GpuIdentityRow],
        seen_at_ms: u64,
    ) -> Result<GpuSetChange, StoreError> {
        let report = check_gpu_report(node_id, gateway_id, gpus, seen_at_ms)?;
        let now = report.seen_at_ms;
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin record node gpus")?;
        let existed = tx
            .query_row(
                "SELECT 1 FROM node_gpu_sets WHERE node_id = ?1",
                [node_id],
                |_| Ok(()),
            )
            .optional()
            .op("read node gpu set")?
            .is_some();
        let previous: Vec<String> = {
            let mut stmt = tx
                .prepare_cached("SELECT uuid FROM node_gpus WHERE node_id = ?1 ORDER BY uuid")
                .op("read node gpus")?;
            let rows = stmt
                .query_map([node_id], |r| r.get::<_, String>(0))
                .op("read node gpus")?;
            rows.collect::<Result<_, _>>().op("read node gpus")?
        };
        let current = report.uuids();
        let changed = existed && previous != current;
        tx.execute("DELETE FROM node_gpus WHERE node_id = ?1", [node_id])
            .op("replace node gpus")?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO node_gpus (node_id, uuid, pci_device_id, driver_version, model) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .op("insert node gpu")?;
            for g in &report.gpus {
                stmt.execute(params![
                    node_id,
                    g.uuid,
                    i64::from(g.pci_device_id),
                    g.driver_version,
                    g.model
                ])
                .op("insert node gpu")?;
            }
        }
        tx.execute(
            "INSERT INTO node_gpu_sets (node_id, gateway_id, first_seen_at_ms, changed_at_ms, \
             seen_at_ms) VALUES (?1, ?2, ?3, ?3, ?3) \
             ON CONFLICT (node_id) DO UPDATE SET gateway_id = excluded.gateway_id, \
             changed_at_ms = CASE WHEN ?4 THEN excluded.seen_at_ms \
                                  ELSE node_gpu_sets.changed_at_ms END, \
             seen_at_ms = excluded.seen_at_ms",
            params![node_id, gateway_id, now, changed],
        )
        .op("record node gpu set")?;
        tx.commit().op("commit node gpus")?;
        Ok(GpuSetChange {
            changed,
            previous,
            first_seen: !existed,
        })
    }

    pub(super) fn gpu_list(&self, node_id: &str) -> Result<Vec<GpuIdentityRow>, StoreError> {
        check_node_id(node_id)?;
        query_all(
            &self.conn(),
            "SELECT uuid, pci_device_id, driver_version, model FROM node_gpus \
             WHERE node_id = ?1 ORDER BY uuid",
            [node_id],
            |r| {
                Ok(GpuIdentityRow {
                    uuid: r.get(0)?,
                    pci_device_id: u32_col(r, 1)?,
                    driver_version: r.get(2)?,
                    model: r.get(3)?,
                })
            },
            "list node gpus",
        )
    }

    pub(super) fn gpu_holders(
        &self,
        uuids: &[String],
        live_since_ms: u64,
    ) -> Result<Vec<GpuHolder>, StoreError> {
        let uuids = check_uuid_query(uuids)?;
        if uuids.is_empty() {
            return Ok(Vec::new());
        }
        // At most MAX_GPUS placeholders, after the two fixed parameters.
        let marks: Vec<String> = (0..uuids.len()).map(|i| format!("?{}", i + 3)).collect();
        let sql = format!(
            "SELECT g.uuid, g.node_id, s.gateway_id, s.seen_at_ms FROM node_gpus g \
             JOIN node_gpu_sets s ON s.node_id = g.node_id \
             WHERE s.seen_at_ms >= ?1 AND g.uuid IN ({}) \
             ORDER BY g.uuid, g.node_id LIMIT ?2",
            marks.join(", ")
        );
        let mut values: Vec<rusqlite::types::Value> = vec![
            saturating_i64(live_since_ms).into(),
            (MAX_GPU_HOLDERS as i64).into(),
        ];
        values.extend(uuids.into_iter().map(rusqlite::types::Value::from));
        query_all(
            &self.conn(),
            &sql,
            params_from_iter(values),
            |r| {
                Ok(GpuHolder {
                    uuid: r.get(0)?,
                    node_id: r.get(1)?,
                    gateway_id: r.get(2)?,
                    seen_at_ms: get_u64(r, 3)?,
                })
            },
            "list gpu uuid holders",
        )
    }

    pub(super) fn gpu_touch(&self, node_id: &str, seen_at_ms: u64) -> Result<bool, StoreError> {
        check_node_id(node_id)?;
        let seen = super::to_i64("seen_at_ms", seen_at_ms)?;
        let conn = self.write_conn();
        // A row already newer is left alone but still counts as found.
        let found = conn
            .execute(
                "UPDATE node_gpu_sets SET seen_at_ms = max(seen_at_ms, ?2) WHERE node_id = ?1",
                params![node_id, seen],
            )
            .op("touch node gpus")?;
        Ok(found > 0)
    }

    pub(super) fn gpu_release(
        &self,
        node_id: &str,
        gateway_id: &str,
        seen_at_ms: u64,
    ) -> Result<bool, StoreError> {
        check_node_id(node_id)?;
        let seen = super::to_i64("seen_at_ms", seen_at_ms)?;
        let conn = self.write_conn();
        // Only the gateway that recorded the set releases it: the node may have moved on.
        let found = conn
            .execute(
                "UPDATE node_gpu_sets SET seen_at_ms = min(seen_at_ms, ?3) \
                 WHERE node_id = ?1 AND gateway_id = ?2",
                params![node_id, gateway_id, seen],
            )
            .op("release node gpus")?;
        Ok(found > 0)
    }

    pub(super) fn gpu_prune(&self, seen_before_ms: u64) -> Result<u64, StoreError> {
        let before = saturating_i64(seen_before_ms);
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin prune node gpus")?;
        tx.execute(
            "DELETE FROM node_gpus WHERE node_id IN \
             (SELECT node_id FROM node_gpu_sets WHERE seen_at_ms < ?1)",
            [before],
        )
        .op("prune node gpus")?;
        let sets = tx
            .execute("DELETE FROM node_gpu_sets WHERE seen_at_ms < ?1", [before])
            .op("prune node gpu sets")?;
        tx.commit().op("commit prune node gpus")?;
        Ok(sets as u64)
    }

    pub(super) fn ver_save(
        &self,
        node_id: &str,
        state: &str,
        reasons_json: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let at = check_verification(node_id, state, reasons_json, at_ms)?;
        self.write_conn()
            .execute(
                "INSERT INTO node_verification (node_id, state, reasons_json, at_ms) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (node_id) DO UPDATE SET state = excluded.state, \
                 reasons_json = excluded.reasons_json, at_ms = excluded.at_ms \
                 WHERE node_verification.at_ms <= excluded.at_ms",
                params![node_id, state, reasons_json, at],
            )
            .op("save verification")?;
        Ok(())
    }

    pub(super) fn ver_load(
        &self,
        node_id: &str,
    ) -> Result<Option<VerificationSnapshot>, StoreError> {
        check_node_id(node_id)?;
        self.conn()
            .query_row(
                "SELECT node_id, state, reasons_json, at_ms FROM node_verification \
                 WHERE node_id = ?1",
                [node_id],
                |r| {
                    Ok(VerificationSnapshot {
                        node_id: r.get(0)?,
                        state: r.get(1)?,
                        reasons_json: r.get(2)?,
                        at_ms: get_u64(r, 3)?,
                    })
                },
            )
            .optional()
            .op("load verification")
    }
}
