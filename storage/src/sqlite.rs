//! SQLite store (placeholder until the storage work lands).
use crate::{Result, StoreError};
/// The embedded store.
pub struct SqliteStore;
impl SqliteStore {
    /// Opens the database file.
    pub fn open(_path: &str) -> Result<Self> {
        Err(StoreError::Config("sqlite store not built yet".into()))
    }
}
