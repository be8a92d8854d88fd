//! The federation's gateway and node directories on PostgreSQL (tables `gateways` and
//! `node_directory`). Portable to CockroachDB: plain upserts (`ON CONFLICT ... DO UPDATE ...
//! WHERE`, the `WHERE` deciding who wins a node id or a gateway id), `UNNEST` of typed arrays
//! for a whole publication in one statement, no advisory locks. Every method is idempotent, so
//! all run with `Retry::Idempotent` on the store's pool.

use ::postgres::Row;

use super::super::directory::{
    caps_from_json, caps_to_json, check_gateway_id, check_gateway_record, check_publication,
    encoders_from_json, encoders_to_json, list_from_json, list_to_json, subdivision_from_db,
};
use super::{pg_err, GatewayRecord, NodeDirEntry, PgConn, PgStore, Retry, StoreError};

/// Migration that creates the directories (appended to `MIGRATIONS`; self-contained).
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE IF NOT EXISTS gateways (
    id               TEXT PRIMARY KEY,
    region           TEXT NOT NULL,
    lat              DOUBLE PRECISION NOT NULL,
    lon              DOUBLE PRECISION NOT NULL,
    quic_address     TEXT NOT NULL,
    http_url         TEXT NOT NULL,
    cert_sha256      TEXT NOT NULL,
    version          TEXT NOT NULL,
    started_at_ms    BIGINT NOT NULL,
    heartbeat_at_ms  BIGINT NOT NULL,
    expires_at_ms    BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS node_directory (
    node_id          TEXT PRIMARY KEY,
    operator_id      TEXT NOT NULL,
    gateway_id       TEXT NOT NULL,
    country          TEXT,
    lat              DOUBLE PRECISION,
    lon              DOUBLE PRECISION,
    gpu_classes      TEXT NOT NULL,
    models           TEXT NOT NULL,
    games            TEXT NOT NULL,
    inference_slots  BIGINT NOT NULL,
    inference_free   BIGINT NOT NULL,
    game_slots       BIGINT NOT NULL,
    game_free        BIGINT NOT NULL,
    accepting        BOOLEAN NOT NULL,
    verification     TEXT NOT NULL,
    updated_at_ms    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS node_directory_by_gateway ON node_directory (gateway_id);
"#;

/// Migration that adds each node's video encoders (issues 13 and 15): a JSON array of
/// `{codec, implementation}`; rows published before it read as `[]`, H.264 only.
pub(crate) const ENCODERS_MIGRATION: &str =
    "ALTER TABLE node_directory ADD COLUMN encoders TEXT NOT NULL DEFAULT '[]'";

/// Migration that adds each node's model capabilities (issue 13): a JSON array of bit sets by
/// model; rows published before it read as `[]`, none declared.
pub(crate) const MODEL_CAPS_MIGRATION: &str =
    "ALTER TABLE node_directory ADD COLUMN model_caps TEXT NOT NULL DEFAULT '[]'";

/// Migration that adds each node's ISO 3166-2 subdivision (issue 13); rows published before
/// it read as NULL, no subdivision.
pub(crate) const SUBDIVISION_MIGRATION: &str =
    "ALTER TABLE node_directory ADD COLUMN subdivision TEXT";

const GATEWAY_COLS: &str = "id, region, lat, lon, quic_address, http_url, cert_sha256, version, \
     started_at_ms, heartbeat_at_ms, expires_at_ms";
const NODE_COLS: &str = "node_id, operator_id, gateway_id, country, lat, lon, gpu_classes, \
     models, games, inference_slots, inference_free, game_slots, game_free, accepting, \
     verification, updated_at_ms, encoders, model_caps, subdivision";

const UPSERT_GATEWAY: &str = "INSERT INTO gateways (id, region, lat, lon, quic_address, http_url, \
     cert_sha256, version, started_at_ms, heartbeat_at_ms, expires_at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
     ON CONFLICT (id) DO UPDATE SET region = excluded.region, lat = excluded.lat, \
     lon = excluded.lon, quic_address = excluded.quic_address, http_url = excluded.http_url, \
     cert_sha256 = excluded.cert_sha256, version = excluded.version, \
     started_at_ms = excluded.started_at_ms, heartbeat_at_ms = excluded.heartbeat_at_ms, \
     expires_at_ms = excluded.expires_at_ms";

/// Non-negative times and counts are stored as BIGINT; values past `i64::MAX` were refused by
/// the checks, so saturating never changes a stored value.
fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn gateway_from_row(r: &Row) -> GatewayRecord {
    GatewayRecord {
        id: r.get(0),
        region: r.get(1),
        lat: r.get(2),
        lon: r.get(3),
        quic_address: r.get(4),
        http_url: r.get(5),
        cert_sha256: r.get(6),
        version: r.get(7),
        started_at_ms: u(r.get(8)),
        heartbeat_at_ms: u(r.get(9)),
        expires_at_ms: u(r.get(10)),
    }
}

fn node_from_row(r: &Row) -> NodeDirEntry {
    let models = list_from_json(r.get(7));
    let models_len = models.len();
    let country: Option<String> = r.get(3);
    let subdivision = subdivision_from_db(country.as_deref(), r.get(18));
    NodeDirEntry {
        node_id: r.get(0),
        operator_id: r.get(1),
        gateway_id: r.get(2),
        country,
        lat: r.get(4),
        lon: r.get(5),
        gpu_classes: list_from_json(r.get(6)),
        models,
        games: list_from_json(r.get(8)),
        inference_slots: u32_of(r.get(9)),
        inference_free: u32_of(r.get(10)),
        game_slots: u32_of(r.get(11)),
        game_free: u32_of(r.get(12)),
        accepting: r.get(13),
        verification: r.get(14),
        updated_at_ms: u(r.get(15)),
        encoders: encoders_from_json(r.get(16)),
        model_caps: caps_from_json(r.get(17), models_len),
        subdivision,
    }
}

/// A publication as one array per column, for `UNNEST`.
#[derive(Default)]
struct NodeColumns {
    node_id: Vec<String>,
    operator_id: Vec<String>,
    gateway_id: Vec<String>,
    country: Vec<Option<String>>,
    lat: Vec<Option<f64>>,
    lon: Vec<Option<f64>>,
    gpu_classes: Vec<String>,
    models: Vec<String>,
    games: Vec<String>,
    inference_slots: Vec<i64>,
    inference_free: Vec<i64>,
    game_slots: Vec<i64>,
    game_free: Vec<i64>,
    accepting: Vec<bool>,
    verification: Vec<String>,
    updated_at_ms: Vec<i64>,
    encoders: Vec<String>,
    model_caps: Vec<String>,
    subdivision: Vec<Option<String>>,
}

impl NodeColumns {
    fn with_capacity(n: usize) -> NodeColumns {
        NodeColumns {
            node_id: Vec::with_capacity(n),
            ..NodeColumns::default()
        }
    }

    fn push(&mut self, n: &NodeDirEntry) {
        self.node_id.push(n.node_id.clone());
        self.operator_id.push(n.operator_id.clone());
        self.gateway_id.push(n.gateway_id.clone());
        self.country.push(n.country.clone());
        self.lat.push(n.lat);
        self.lon.push(n.lon);
        self.gpu_classes.push(list_to_json(&n.gpu_classes));
        self.models.push(list_to_json(&n.models));
        self.games.push(list_to_json(&n.games));
        self.inference_slots.push(i64::from(n.inference_slots));
        self.inference_free.push(i64::from(n.inference_free));
        self.game_slots.push(i64::from(n.game_slots));
        self.game_free.push(i64::from(n.game_free));
        self.accepting.push(n.accepting);
        self.verification.push(n.verification.clone());
        self.updated_at_ms.push(i(n.updated_at_ms));
        self.encoders.push(encoders_to_json(&n.encoders));
        self.model_caps.push(caps_to_json(&n.model_caps));
        self.subdivision.push(n.subdivision.clone());
    }
}

impl PgStore {
    fn upsert_gateway(
        client: &mut impl ::postgres::GenericClient,
        r: &GatewayRecord,
        guard_now_ms: Option<u64>,
    ) -> Result<u64, StoreError> {
        let (sql, now);
        match guard_now_ms {
            Some(n) => {
                sql = format!(
                    "{UPSERT_GATEWAY} WHERE gateways.cert_sha256 = excluded.cert_sha256 \
                     OR gateways.expires_at_ms <= $12"
                );
                now = i(n);
            }
            None => {
                sql = UPSERT_GATEWAY.to_string();
                now = 0;
            }
        }
        let (started, beat, expires) =
            (i(r.started_at_ms), i(r.heartbeat_at_ms), i(r.expires_at_ms));
        let mut p: Vec<&(dyn ::postgres::types::ToSql + Sync)> = vec![
            &r.id,
            &r.region,
            &r.lat,
            &r.lon,
            &r.quic_address,
            &r.http_url,
            &r.cert_sha256,
            &r.version,
            &started,
            &beat,
            &expires,
        ];
        if guard_now_ms.is_some() {
            p.push(&now);
        }
        client
            .execute(sql.as_str(), &p)
            .map_err(pg_err("upsert gateway"))
    }

    pub(crate) fn dir_heartbeat(&self, record: &GatewayRecord) -> Result<(), StoreError> {
        check_gateway_record(record)?;
        self.run(Retry::Idempotent, |conn| {
            Self::upsert_gateway(&mut **conn, record, None)?;
            Ok(())
        })
    }

    pub(crate) fn dir_join(
        &self,
        record: &GatewayRecord,
        now_ms: u64,
    ) -> Result<Option<GatewayRecord>, StoreError> {
        check_gateway_record(record)?;
        // Idempotent: a retried join after a commit whose answer was lost finds its own pin.
        self.run(Retry::Idempotent, |conn| {
            Self::join_tx(conn, record, now_ms)
        })
    }

    fn join_tx(
        conn: &mut PgConn,
        record: &GatewayRecord,
        now_ms: u64,
    ) -> Result<Option<GatewayRecord>, StoreError> {
        let mut tx = conn.transaction().map_err(pg_err("begin gateway join"))?;
        // The conditional upsert locks the conflicting row, so a concurrent join of the same
        // id waits here and then sees this one's row.
        if Self::upsert_gateway(&mut tx, record, Some(now_ms))? == 1 {
            tx.commit().map_err(pg_err("commit gateway join"))?;
            return Ok(None);
        }
        let holder = tx
            .query_opt(
                &format!("SELECT {GATEWAY_COLS} FROM gateways WHERE id = $1"),
                &[&record.id],
            )
            .map_err(pg_err("read gateway holder"))?
            .map(|r| gateway_from_row(&r));
        Ok(holder)
    }

    pub(crate) fn dir_leave(&self, gateway_id: &str) -> Result<(), StoreError> {
        check_gateway_id("gateway_id", gateway_id)?;
        self.run(Retry::Idempotent, |conn| {
            let mut tx = conn.transaction().map_err(pg_err("begin gateway leave"))?;
            tx.execute(
                "DELETE FROM node_directory WHERE gateway_id = $1",
                &[&gateway_id],
            )
            .map_err(pg_err("delete gateway's nodes"))?;
            tx.execute("DELETE FROM gateways WHERE id = $1", &[&gateway_id])
                .map_err(pg_err("delete gateway"))?;
            tx.commit().map_err(pg_err("commit gateway leave"))
        })
    }

    pub(crate) fn dir_list_gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        self.run(Retry::Idempotent, |conn| {
            let rows = conn
                .query(
                    &format!("SELECT {GATEWAY_COLS} FROM gateways ORDER BY id"),
                    &[],
                )
                .map_err(pg_err("list gateways"))?;
            Ok(rows.iter().map(gateway_from_row).collect())
        })
    }

    pub(crate) fn dir_publish_nodes(
        &self,
        gateway_id: &str,
        nodes: &[NodeDirEntry],
    ) -> Result<(), StoreError> {
        check_publication(gateway_id, nodes)?;
        // A node another gateway published more recently (it moved there) keeps that entry.
        let mut cols = NodeColumns::with_capacity(nodes.len());
        for n in nodes {
            cols.push(n);
        }
        self.run(Retry::Idempotent, |conn| {
            Self::publish_tx(conn, gateway_id, &cols)
        })
    }

    fn publish_tx(
        conn: &mut PgConn,
        gateway_id: &str,
        cols: &NodeColumns,
    ) -> Result<(), StoreError> {
        let mut tx = conn.transaction().map_err(pg_err("begin publish nodes"))?;
        tx.execute(
            "DELETE FROM node_directory WHERE gateway_id = $1",
            &[&gateway_id],
        )
        .map_err(pg_err("replace gateway's nodes"))?;
        // One statement for the whole set (column arrays through UNNEST, which CockroachDB
        // has too): a row per round trip made 1,000 nodes cost ~450 ms.
        tx.execute(
            &format!(
                "INSERT INTO node_directory ({NODE_COLS}) \
                 SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], \
                 $5::DOUBLE PRECISION[], $6::DOUBLE PRECISION[], $7::TEXT[], $8::TEXT[], \
                 $9::TEXT[], $10::BIGINT[], $11::BIGINT[], $12::BIGINT[], $13::BIGINT[], \
                 $14::BOOLEAN[], $15::TEXT[], $16::BIGINT[], $17::TEXT[], $18::TEXT[], \
                 $19::TEXT[]) \
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
            ),
            &[
                &cols.node_id,
                &cols.operator_id,
                &cols.gateway_id,
                &cols.country,
                &cols.lat,
                &cols.lon,
                &cols.gpu_classes,
                &cols.models,
                &cols.games,
                &cols.inference_slots,
                &cols.inference_free,
                &cols.game_slots,
                &cols.game_free,
                &cols.accepting,
                &cols.verification,
                &cols.updated_at_ms,
                &cols.encoders,
                &cols.model_caps,
                &cols.subdivision,
            ],
        )
        .map_err(pg_err("publish nodes"))?;
        tx.commit().map_err(pg_err("commit publish nodes"))
    }

    pub(crate) fn dir_list_nodes(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        self.run(Retry::Idempotent, |conn| {
            let rows = conn
                .query(
                    &format!("SELECT {NODE_COLS} FROM node_directory ORDER BY node_id"),
                    &[],
                )
                .map_err(pg_err("list node directory"))?;
            Ok(rows.iter().map(node_from_row).collect())
        })
    }
}
