//! PostgreSQL queries of cross-gateway redirects (issue 13): the federation's secret.

use super::{pg_err, PgStore};
use crate::store::StoreError;

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
}
