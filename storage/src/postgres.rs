//! PostgreSQL store (placeholder until the storage work lands).
use crate::{Result, StoreError};
/// The PostgreSQL store.
pub struct PgStore;
impl PgStore {
    /// Opens the database file.
    pub fn connect(_url: &str) -> Result<Self> {
        Err(StoreError::Config("postgres store not built yet".into()))
    }
}
