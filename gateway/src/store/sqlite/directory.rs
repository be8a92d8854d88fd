//! The federation's gateway and node directories on SQLite (tables `gateways` and
//! `node_directory`, migration 5; `node_directory.encoders`, migration 11;
//! `node_directory.subdivision`, migration 13). Gateways that share one SQLite file (tests, or several
//! gateway processes on one host) see each other exactly as they would on PostgreSQL.

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use super::super::directory::{
    caps_from_json, caps_to_json, check_gateway_id, check_gateway_record, check_publication,
    encoders_from_json, encoders_to_json, list_from_json, list_to_json, subdivision_from_db,
};
use super::super::{GatewayRecord, NodeDirEntry, StoreError};
use super::{get_u64, query_all, saturating_i64, OpExt, SqliteStore};

const GATEWAY_COLS: &str = "id, region, lat, lon, quic_address, http_url, cert_sha256, version, \
     started_at_ms, heartbeat_at_ms, expires_at_ms";
const NODE_COLS: &str = "node_id, operator_id, gateway_id, country, lat, lon, gpu_classes, \
     models, games, inference_slots, inference_free, game_slots, game_free, accepting, \
     verification, updated_at_ms, encoders, model_caps, subdivision";

fn gateway_from_row(r: &Row<'_>) -> rusqlite::Result<GatewayRecord> {
    Ok(GatewayRecord {
        id: r.get(0)?,
        region: r.get(1)?,
        lat: r.get(2)?,
        lon: r.get(3)?,
        quic_address: r.get(4)?,
        http_url: r.get(5)?,
        cert_sha256: r.get(6)?,
        version: r.get(7)?,
        started_at_ms: get_u64(r, 8)?,
        heartbeat_at_ms: get_u64(r, 9)?,
        expires_at_ms: get_u64(r, 10)?,
    })
}

fn u32_col(r: &Row<'_>, idx: usize) -> rusqlite::Result<u32> {
    let v: i64 = r.get(idx)?;
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

fn node_from_row(r: &Row<'_>) -> rusqlite::Result<NodeDirEntry> {
    let models = list_from_json(&r.get::<_, String>(7)?);
    let models_len = models.len();
    let country: Option<String> = r.get(3)?;
    let subdivision = subdivision_from_db(country.as_deref(), r.get(18)?);
    Ok(NodeDirEntry {
        node_id: r.get(0)?,
        operator_id: r.get(1)?,
        gateway_id: r.get(2)?,
        country,
        lat: r.get(4)?,
        lon: r.get(5)?,
        gpu_classes: list_from_json(&r.get::<_, String>(6)?),
        models,
        games: list_from_json(&r.get::<_, String>(8)?),
        inference_slots: u32_col(r, 9)?,
        inference_free: u32_col(r, 10)?,
        game_slots: u32_col(r, 11)?,
        game_free: u32_col(r, 12)?,
        accepting: r.get(13)?,
        verification: r.get(14)?,
        updated_at_ms: get_u64(r, 15)?,
        encoders: encoders_from_json(&r.get::<_, String>(16)?),
        model_caps: caps_from_json(&r.get::<_, String>(17)?, models_len),
        subdivision,
    })
}

/// The upsert of a gateway row; with `guarded`, an existing row is replaced only when it has
/// the same certificate pin or its lease expired before `?12`.
fn upsert_gateway(
    conn: &Connection,
    r: &GatewayRecord,
    guard_now_ms: Option<u64>,
) -> Result<usize, StoreError> {
    let guard = if guard_now_ms.is_some() {
        " WHERE gateways.cert_sha256 = excluded.cert_sha256 OR gateways.expires_at_ms <= ?12"
    } else {
        " WHERE ?12 IS NULL"
    };
    conn.execute(
        &format!(
            "INSERT INTO gateways ({GATEWAY_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
             ON CONFLICT (id) DO UPDATE SET region = excluded.region, lat = excluded.lat, \
             lon = excluded.lon, quic_address = excluded.quic_address, \
             http_url = excluded.http_url, cert_sha256 = excluded.cert_sha256, \
             version = excluded.version, started_at_ms = excluded.started_at_ms, \
             heartbeat_at_ms = excluded.heartbeat_at_ms, expires_at_ms = excluded.expires_at_ms{guard}"
        ),
        params![
            r.id,
            r.region,
            r.lat,
            r.lon,
            r.quic_address,
            r.http_url,
            r.cert_sha256,
            r.version,
            saturating_i64(r.started_at_ms),
            saturating_i64(r.heartbeat_at_ms),
            saturating_i64(r.expires_at_ms),
            guard_now_ms.map(saturating_i64),
        ],
    )
    .op("upsert gateway")
}

impl SqliteStore {
    pub(super) fn dir_heartbeat(&self, record: &GatewayRecord) -> Result<(), StoreError> {
        check_gateway_record(record)?;
        let conn = self.write_conn();
        upsert_gateway(&conn, record, None)?;
        Ok(())
    }

    pub(super) fn dir_join(
        &self,
        record: &GatewayRecord,
        now_ms: u64,
    ) -> Result<Option<GatewayRecord>, StoreError> {
        check_gateway_record(record)?;
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin gateway join")?;
        let written = upsert_gateway(&tx, record, Some(now_ms))?;
        if written == 1 {
            tx.commit().op("commit gateway join")?;
            return Ok(None);
        }
        let holder = tx
            .query_row(
                &format!("SELECT {GATEWAY_COLS} FROM gateways WHERE id = ?1"),
                [&record.id],
                gateway_from_row,
            )
            .optional()
            .op("read gateway holder")?;
        Ok(holder)
    }

    pub(super) fn dir_leave(&self, gateway_id: &str) -> Result<(), StoreError> {
        check_gateway_id("gateway_id", gateway_id)?;
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin gateway leave")?;
        tx.execute(
            "DELETE FROM node_directory WHERE gateway_id = ?1",
            [gateway_id],
        )
        .op("delete gateway's nodes")?;
        tx.execute("DELETE FROM gateways WHERE id = ?1", [gateway_id])
            .op("delete gateway")?;
        tx.commit().op("commit gateway leave")
    }

    pub(super) fn dir_list_gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        query_all(
            &self.conn(),
            &format!("SELECT {GATEWAY_COLS} FROM gateways ORDER BY id"),
            [],
            gateway_from_row,
            "list gateways",
        )
    }

    pub(super) fn dir_publish_nodes(
        &self,
        gateway_id: &str,
        nodes: &[NodeDirEntry],
    ) -> Result<(), StoreError> {
        check_publication(gateway_id, nodes)?;
        let mut conn = self.write_conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .op("begin publish nodes")?;
        tx.execute(
            "DELETE FROM node_directory WHERE gateway_id = ?1",
            [gateway_id],
        )
        .op("replace gateway's nodes")?;
        {
            // A node another gateway published more recently (it moved there) keeps that entry.
            let mut stmt = tx
                .prepare_cached(&format!(
                    "INSERT INTO node_directory ({NODE_COLS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19) \
                     ON CONFLICT (node_id) DO UPDATE SET operator_id = excluded.operator_id, \
                     gateway_id = excluded.gateway_id, country = excluded.country, \
                     lat = excluded.lat, lon = excluded.lon, gpu_classes = excluded.gpu_classes, \
                     models = excluded.models, games = excluded.games, \
                     inference_slots = excluded.inference_slots, \
                     inference_free = excluded.inference_free, game_slots = excluded.game_slots, \
                     game_free = excluded.game_free, accepting = excluded.accepting, \
                     verification = excluded.verification, updated_at_ms = excluded.updated_at_ms, \
                     encoders = excluded.encoders, model_caps = excluded.model_caps, \
                     subdivision = excluded.subdivision \
                     WHERE node_directory.updated_at_ms <= excluded.updated_at_ms"
                ))
                .op("prepare publish node")?;
            for n in nodes {
                stmt.execute(params![
                    n.node_id,
                    n.operator_id,
                    n.gateway_id,
                    n.country,
                    n.lat,
                    n.lon,
                    list_to_json(&n.gpu_classes),
                    list_to_json(&n.models),
                    list_to_json(&n.games),
                    n.inference_slots,
                    n.inference_free,
                    n.game_slots,
                    n.game_free,
                    n.accepting,
                    n.verification,
                    saturating_i64(n.updated_at_ms),
                    encoders_to_json(&n.encoders),
                    caps_to_json(&n.model_caps),
                    n.subdivision,
                ])
                .op("publish node")?;
            }
        }
        tx.commit().op("commit publish nodes")
    }

    pub(super) fn dir_list_nodes(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        query_all(
            &self.conn(),
            &format!("SELECT {NODE_COLS} FROM node_directory ORDER BY node_id"),
            [],
            node_from_row,
            "list node directory",
        )
    }
}
