//! PostgreSQL queries of cross-gateway game sessions (issue 13): the federation's secret
//! (redirect tickets) and the sessions directory (resume through another gateway).

use super::{pg_err, PgStore};
use crate::store::{SessionDirEntry, StoreError};

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl PgStore {
    /// See [`crate::store::Store::federation_secret`]. `ON CONFLICT DO NOTHING` then a read:
    /// of gateways racing to create it, one insert wins and all read the winner (portable to
    /// CockroachDB).
    pub(crate) fn pg_federation_secret(&self, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        if candidate.len() < 32 {
            return Err(StoreError::Invalid {
                field: "candidate",
                message: "a federation secret must be at least 32 bytes".into(),
            });
        }
        let mut conn = self.conn()?;
        let now = i64::try_from(crate::clock::system_unix_ms()).unwrap_or(i64::MAX);
        conn.execute(
            "INSERT INTO federation_secret (id, secret, created_at_ms) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
            &[&candidate, &now],
        )
        .map_err(pg_err("create federation secret"))?;
        let row = conn
            .query_one("SELECT secret FROM federation_secret WHERE id = 1", &[])
            .map_err(pg_err("read federation secret"))?;
        Ok(row.get::<_, Vec<u8>>(0))
    }

    /// See [`crate::store::Store::put_session_dir`]. The id, a random u64, is stored bit for
    /// bit as a BIGINT.
    pub(crate) fn pg_put_session_dir(&self, e: &SessionDirEntry) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        conn.execute(
            "INSERT INTO game_session_dir (session_id, key_id, node_id, gateway_id, game, \
             width, height, fps, bitrate_kbps, resume_token_sha256, updated_at_ms, codec) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (session_id) DO UPDATE SET key_id = excluded.key_id, \
             node_id = excluded.node_id, gateway_id = excluded.gateway_id, \
             game = excluded.game, width = excluded.width, height = excluded.height, \
             fps = excluded.fps, bitrate_kbps = excluded.bitrate_kbps, \
             resume_token_sha256 = excluded.resume_token_sha256, \
             updated_at_ms = excluded.updated_at_ms, codec = excluded.codec",
            &[
                &(e.session_id as i64),
                &e.key_id,
                &e.node_id,
                &e.gateway_id,
                &e.game,
                &i64::from(e.width),
                &i64::from(e.height),
                &i64::from(e.fps),
                &i64::from(e.bitrate_kbps),
                &e.resume_token_sha256,
                &i64_of(e.updated_at_ms),
                &e.codec.as_str(),
            ],
        )
        .map_err(pg_err("put session directory entry"))?;
        Ok(())
    }

    /// See [`crate::store::Store::get_session_dir`].
    pub(crate) fn pg_get_session_dir(
        &self,
        session_id: u64,
    ) -> Result<Option<SessionDirEntry>, StoreError> {
        let mut conn = self.conn()?;
        let row = conn
            .query_opt(
                "SELECT session_id, key_id, node_id, gateway_id, game, width, height, fps, \
                 bitrate_kbps, resume_token_sha256, updated_at_ms, codec FROM game_session_dir \
                 WHERE session_id = $1",
                &[&(session_id as i64)],
            )
            .map_err(pg_err("get session directory entry"))?;
        let u32_of = |v: i64| u32::try_from(v).unwrap_or(0);
        Ok(row.map(|r| SessionDirEntry {
            session_id: r.get::<_, i64>(0) as u64,
            key_id: r.get(1),
            node_id: r.get(2),
            gateway_id: r.get(3),
            game: r.get(4),
            width: u32_of(r.get(5)),
            height: u32_of(r.get(6)),
            fps: u32_of(r.get(7)),
            bitrate_kbps: u32_of(r.get(8)),
            resume_token_sha256: r.get(9),
            updated_at_ms: u64::try_from(r.get::<_, i64>(10)).unwrap_or(0),
            // A name this build does not know (a newer build wrote it) reads as H.264.
            codec: nearpath_protocol::message::VideoCodec::from_name(&r.get::<_, String>(11))
                .unwrap_or_default(),
        }))
    }

    /// See [`crate::store::Store::remove_session_dir`].
    pub(crate) fn pg_remove_session_dir(
        &self,
        session_id: u64,
        gateway_id: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        conn.execute(
            "DELETE FROM game_session_dir WHERE session_id = $1 AND gateway_id = $2",
            &[&(session_id as i64), &gateway_id],
        )
        .map_err(pg_err("remove session directory entry"))?;
        Ok(())
    }
}
