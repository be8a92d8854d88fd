//! The federation's ticket secret as a process reads it: once, from the store.

use super::Store;
use std::sync::Arc;

/// The federation's secret (`Store::federation_secret`), read (or created) in the store once
/// per process and shared by everything that MACs tickets (game redirects, inference
/// redirects), so they all agree with every other gateway of the federation.
pub struct FederationSecret {
    store: Arc<dyn Store>,
    cell: tokio::sync::OnceCell<Arc<[u8]>>,
}

impl FederationSecret {
    pub fn new(store: Arc<dyn Store>) -> FederationSecret {
        FederationSecret {
            store,
            cell: tokio::sync::OnceCell::new(),
        }
    }

    /// The secret; an error (the store's, or a stored secret shorter than 32 bytes) is
    /// retried on the next call.
    pub async fn get(&self) -> Result<Arc<[u8]>, String> {
        self.cell
            .get_or_try_init(|| async {
                let store = self.store.clone();
                let candidate: [u8; 32] = rand::random();
                let s = tokio::task::spawn_blocking(move || store.federation_secret(&candidate))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                if s.len() < 32 {
                    return Err("the stored federation secret is shorter than 32 bytes".into());
                }
                Ok(Arc::from(s))
            })
            .await
            .cloned()
    }
}
