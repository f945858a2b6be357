//! The content index: a small SQLite database in the cache directory (`index.sqlite`) that
//! records, durably, which content the daemon knows, whether it is cached, when it was last used,
//! and on which nodes a verified copy was placed.
//!
//! Why here and not in the daemon's main store: the index describes the bytes of this cache
//! directory and of the nodes, and lives and dies with that directory (a database restored from
//! a backup with another cache would disagree with it anyway); it keeps [`super::Content`]
//! independent of the schema migrations of the main store; and it is only ever a record of what
//! can be re-checked: the cache is scanned at open and every node can LIST what it holds (nodes
//! are content-addressed and keep only verified objects), so a lost or stale index is rebuilt,
//! never trusted blindly (see `background.rs`, reconcile).
//!
//! Every write is its own transaction with `synchronous = FULL`: a placement is on disk before
//! the local copy it allows to delete is deleted.

use crate::node::Sha256;
use rusqlite::{params, Connection, OptionalExtension};
use std::io;
use std::path::Path;

/// One recorded copy on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The node's configured name.
    pub node: String,
    /// The object's size.
    pub size: u64,
}

/// A row of `objects`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Its hash.
    pub sha: Sha256,
    /// Its size.
    pub size: u64,
    /// Whether the cache holds it (as far as the index knows; the scan at open corrects it).
    pub cached: bool,
    /// Its last use (an LRU tick).
    pub last_access: u64,
    /// Forgotten: its node copies are still being deleted.
    pub forgotten: bool,
}

/// The open index.
pub struct Index {
    db: Connection,
}

fn err(e: rusqlite::Error) -> io::Error {
    io::Error::other(format!("content index: {e}"))
}

fn sha_of(blob: Vec<u8>) -> Option<Sha256> {
    <[u8; 32]>::try_from(blob.as_slice()).ok().map(Sha256)
}

impl Index {
    /// Opens (creating) the index at `path`.
    pub fn open(path: &Path) -> io::Result<Index> {
        let db = Connection::open(path).map_err(err)?;
        db.busy_timeout(std::time::Duration::from_secs(10)).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS objects (
                 sha BLOB PRIMARY KEY,
                 size INTEGER NOT NULL,
                 cached INTEGER NOT NULL,
                 last_access INTEGER NOT NULL,
                 forgotten INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS placements (
                 sha BLOB NOT NULL,
                 node TEXT NOT NULL,
                 size INTEGER NOT NULL,
                 placed_at INTEGER NOT NULL,
                 PRIMARY KEY (sha, node)
             );
             CREATE INDEX IF NOT EXISTS placements_by_node ON placements (node, sha);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(err)?;
        Ok(Index { db })
    }

    /// Every object row.
    pub fn objects(&self) -> io::Result<Vec<Object>> {
        let mut stmt = self.db.prepare("SELECT sha, size, cached, last_access, forgotten FROM objects").map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, bool>(2)?, r.get::<_, i64>(3)?, r.get(4)?))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (sha, size, cached, last_access, forgotten) = row.map_err(err)?;
            if let Some(sha) = sha_of(sha) {
                out.push(Object { sha, size: size as u64, cached, last_access: last_access as u64, forgotten });
            }
        }
        Ok(out)
    }

    /// One object row.
    pub fn object(&self, sha: Sha256) -> io::Result<Option<Object>> {
        self.db
            .query_row(
                "SELECT size, cached, last_access, forgotten FROM objects WHERE sha = ?1",
                params![&sha.0[..]],
                |r| {
                    Ok(Object {
                        sha,
                        size: r.get::<_, i64>(0)? as u64,
                        cached: r.get(1)?,
                        last_access: r.get::<_, i64>(2)? as u64,
                        forgotten: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(err)
    }

    /// Records that the cache holds `sha` (and that it is not forgotten).
    pub fn set_cached(&self, sha: Sha256, size: u64, tick: u64) -> io::Result<()> {
        self.db
            .execute(
                "INSERT INTO objects (sha, size, cached, last_access, forgotten) VALUES (?1, ?2, 1, ?3, 0)
                 ON CONFLICT (sha) DO UPDATE SET size = ?2, cached = 1, last_access = ?3, forgotten = 0",
                params![&sha.0[..], size as i64, tick as i64],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Records that the cache no longer holds `sha`; the row goes when nothing else holds it.
    pub fn set_uncached(&self, sha: Sha256) -> io::Result<()> {
        self.db.execute("UPDATE objects SET cached = 0 WHERE sha = ?1", params![&sha.0[..]]).map_err(err)?;
        self.drop_if_unheld(sha)
    }

    /// Persists last-use ticks.
    pub fn touch(&mut self, ticks: &[(Sha256, u64)]) -> io::Result<()> {
        let tx = self.db.transaction().map_err(err)?;
        {
            let mut stmt = tx.prepare("UPDATE objects SET last_access = ?2 WHERE sha = ?1").map_err(err)?;
            for (sha, tick) in ticks {
                stmt.execute(params![&sha.0[..], *tick as i64]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Marks `sha` forgotten: its node copies are to be deleted even if this process dies now.
    pub fn set_forgotten(&self, sha: Sha256) -> io::Result<()> {
        self.db
            .execute("UPDATE objects SET forgotten = 1, cached = 0 WHERE sha = ?1", params![&sha.0[..]])
            .map_err(err)?;
        self.drop_if_unheld(sha)
    }

    /// Records a verified copy of `sha` on `node`. Called only after the node said STORED (it
    /// verified the hash); never for a transfer in progress.
    pub fn add_placement(&self, sha: Sha256, node: &str, size: u64) -> io::Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.db
            .execute(
                "INSERT INTO objects (sha, size, cached, last_access, forgotten) VALUES (?1, ?3, 0, 0, 0)
                 ON CONFLICT (sha) DO NOTHING",
                params![&sha.0[..], node, size as i64],
            )
            .map_err(err)?;
        self.db
            .execute(
                "INSERT INTO placements (sha, node, size, placed_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (sha, node) DO UPDATE SET size = ?3",
                params![&sha.0[..], node, size as i64, now as i64],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Forgets the copy of `sha` on `node` (deleted, or found missing).
    pub fn remove_placement(&self, sha: Sha256, node: &str) -> io::Result<()> {
        self.db
            .execute("DELETE FROM placements WHERE sha = ?1 AND node = ?2", params![&sha.0[..], node])
            .map_err(err)?;
        self.drop_if_unheld(sha)
    }

    /// The recorded copies of `sha`.
    pub fn placements(&self, sha: Sha256) -> io::Result<Vec<Placement>> {
        let mut stmt = self.db.prepare_cached("SELECT node, size FROM placements WHERE sha = ?1").map_err(err)?;
        let rows = stmt
            .query_map(params![&sha.0[..]], |r| Ok(Placement { node: r.get(0)?, size: r.get::<_, i64>(1)? as u64 }))
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// Every placement on `node`: (sha, size).
    pub fn placements_on(&self, node: &str) -> io::Result<Vec<(Sha256, u64)>> {
        let mut stmt = self.db.prepare("SELECT sha, size FROM placements WHERE node = ?1 ORDER BY sha").map_err(err)?;
        let rows =
            stmt.query_map(params![node], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))).map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (sha, size) = row.map_err(err)?;
            if let Some(sha) = sha_of(sha) {
                out.push((sha, size as u64));
            }
        }
        Ok(out)
    }

    /// Objects placed on each node: (node, objects, bytes).
    pub fn counts(&self) -> io::Result<Vec<(String, u64, u64)>> {
        let mut stmt = self
            .db
            .prepare("SELECT node, COUNT(*), COALESCE(SUM(size), 0) FROM placements GROUP BY node")
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)))
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// The LRU tick at the last rebalance (0 before the first).
    pub fn cold_mark(&self) -> io::Result<u64> {
        let value: Option<i64> = self
            .db
            .query_row("SELECT value FROM meta WHERE key = 'cold_mark'", [], |r| r.get(0))
            .optional()
            .map_err(err)?;
        Ok(value.unwrap_or(0) as u64)
    }

    /// Records the LRU tick of a rebalance.
    pub fn set_cold_mark(&self, tick: u64) -> io::Result<()> {
        self.db
            .execute(
                "INSERT INTO meta (key, value) VALUES ('cold_mark', ?1) ON CONFLICT (key) DO UPDATE SET value = ?1",
                params![tick as i64],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Removes an object row that nothing holds any more (not cached, no placement).
    fn drop_if_unheld(&self, sha: Sha256) -> io::Result<()> {
        self.db
            .execute(
                "DELETE FROM objects WHERE sha = ?1 AND cached = 0
                 AND NOT EXISTS (SELECT 1 FROM placements WHERE placements.sha = ?1)",
                params![&sha.0[..]],
            )
            .map_err(err)?;
        Ok(())
    }
}

/// Objects per node from the index at `path`, read-only (for `chimed admin nodes`); empty when
/// there is no index.
pub fn counts_at(path: &Path) -> io::Result<Vec<(String, u64, u64)>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let db = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
    db.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
    Index { db }.counts()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_go_when_nothing_holds_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("open");
        let a = Sha256([1; 32]);
        index.set_cached(a, 10, 1).expect("cached");
        index.add_placement(a, "n1", 10).expect("placed");
        index.set_uncached(a).expect("uncached");
        assert_eq!(index.placements(a).expect("placements"), [Placement { node: "n1".into(), size: 10 }]);
        assert!(index.object(a).expect("object").is_some_and(|o| !o.cached));
        assert_eq!(index.counts().expect("counts"), [("n1".into(), 1, 10)]);
        index.remove_placement(a, "n1").expect("removed");
        assert!(index.object(a).expect("object").is_none());
    }
}
