//! The embedded store: one SQLite file, one connection per [`SqliteStore`].
//!
//! Several worker threads open the same file, each with its own connection. WAL mode lets readers
//! run beside the one writer; every write transaction starts with `BEGIN IMMEDIATE`, so it takes
//! the write lock up front and waits (busy timeout) instead of failing halfway with
//! `SQLITE_BUSY` when another connection writes. `synchronous=FULL` makes a commit durable
//! against power loss before the method returns.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior};

use crate::batch::{self, Probe};
use crate::{
    from_db, now_ms, to_db, Delta, DeltaKind, MemberRecord, NewPost, NewSession, PostOutcome, Result, RoomId, RoomKind,
    RoomRecord, Store, StoreError, UserId, UserRecord,
};

/// The embedded migrations (`embedded::embedded::migrations::runner()`), private to this module.
mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

/// How long a connection waits for another connection's write lock before giving up. Group
/// commits are short; this only runs out when the disk or a process is stuck.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Migrations run one connection at a time: workers opening a fresh file together would otherwise
/// all try to create the same tables.
static MIGRATION_LOCK: Mutex<()> = Mutex::new(());

/// The embedded store: a connection to one SQLite database file.
pub struct SqliteStore {
    /// The connection, with its prepared statement cache.
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if needed, along with its parent directory) the database file at `path`,
    /// configures the connection and applies pending migrations.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Config(format!("cannot create directory {}: {e}", parent.display())))?;
        }
        let mut conn =
            Connection::open(path).map_err(|e| StoreError::Config(format!("cannot open {}: {e}", path.display())))?;
        // Held while setting WAL mode too: switching the journal mode of a fresh file needs an
        // exclusive lock.
        let _guard = MIGRATION_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Config(format!("{} cannot use WAL mode (journal mode is {mode})", path.display())));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;").map_err(db_err)?;
        conn.set_prepared_statement_cache_capacity(64);
        embedded::migrations::runner().run(&mut conn).map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(SqliteStore { conn })
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`) and commits if it returns `Ok`.
    fn write<T>(&mut self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        let value = f(&tx)?;
        tx.commit().map_err(db_err)?;
        Ok(value)
    }
}

/// Maps a SQLite error: a unique violation is a `Conflict`, a missing referenced row `NotFound`.
fn db_err(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(code, _) = &e {
        if code.code == ErrorCode::ConstraintViolation {
            match code.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                    return StoreError::Conflict(e.to_string())
                }
                rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY => return StoreError::NotFound(e.to_string()),
                _ => {}
            }
        }
    }
    log::warn!("sqlite: {e}");
    StoreError::Database(e.to_string())
}

fn user_row(row: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord { id: from_db(row.get(0)?), name: row.get(1)?, password_hash: row.get(2)? })
}

fn room_row(row: &Row<'_>) -> rusqlite::Result<RoomRecord> {
    Ok(RoomRecord {
        id: from_db(row.get(0)?),
        name: row.get(1)?,
        kind: RoomKind(row.get(2)?),
        last_seq: from_db(row.get(3)?),
    })
}

/// Bumps a room's head by one and returns the new seq, or `None` when the room does not exist.
fn next_seq(conn: &Connection, room: RoomId) -> Result<Option<u64>> {
    conn.prepare_cached("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq")
        .and_then(|mut st| st.query_row([to_db(room)], |row| row.get::<_, i64>(0)).optional())
        .map(|seq| seq.map(from_db))
        .map_err(db_err)
}

/// Inserts one delta row.
fn insert_delta(conn: &Connection, delta: &Delta, key: Option<&str>) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at, idempotency_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut st| {
        st.execute(params![
            to_db(delta.room),
            to_db(delta.seq),
            delta.kind.0,
            to_db(delta.author_id),
            delta.text,
            delta.ts_ms,
            key,
        ])
    })
    .map(drop)
    .map_err(db_err)
}

/// Appends a membership delta (`JOIN`, `LEAVE`) with the room's next seq.
fn membership_delta(
    conn: &Connection,
    room: RoomId,
    kind: DeltaKind,
    user: UserId,
    user_name: &str,
    now_ms: i64,
) -> Result<Option<Delta>> {
    let Some(seq) = next_seq(conn, room)? else { return Ok(None) };
    let delta =
        Delta { room, seq, kind, author_id: user, author: user_name.into(), ts_ms: now_ms, text: String::new() };
    insert_delta(conn, &delta, None)?;
    Ok(Some(delta))
}

impl Store for SqliteStore {
    fn create_user(&mut self, name: &str, password_hash: &str) -> Result<UserRecord> {
        self.write(|conn| {
            let id: i64 = conn
                .prepare_cached("INSERT INTO users (name, password_hash, created_at) VALUES (?1, ?2, ?3) RETURNING id")
                .and_then(|mut st| st.query_row(params![name, password_hash, now_ms()], |row| row.get(0)))
                .map_err(db_err)?;
            Ok(UserRecord { id: from_db(id), name: name.into(), password_hash: password_hash.into() })
        })
    }

    fn user_by_name(&mut self, name: &str) -> Result<Option<UserRecord>> {
        self.conn
            .prepare_cached("SELECT id, name, password_hash FROM users WHERE name = ?1")
            .and_then(|mut st| st.query_row([name], user_row).optional())
            .map_err(db_err)
    }

    fn create_session(&mut self, session: &NewSession) -> Result<()> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO sessions (user_id, token_hash, ip, user_agent, created_at, last_used_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    to_db(session.user_id),
                    &session.token_hash[..],
                    session.ip,
                    session.user_agent,
                    session.now_ms,
                ])
            })
            .map(drop)
            .map_err(db_err)
        })
    }

    fn session_user(&mut self, token_hash: &[u8; 32], now_ms: i64) -> Result<Option<UserRecord>> {
        self.write(|conn| {
            // SQLite's RETURNING cannot see joined tables, hence two statements.
            let user: Option<i64> = conn
                .prepare_cached(
                    "UPDATE sessions SET last_used_at = ?2
                     WHERE token_hash = ?1 AND revoked_at IS NULL RETURNING user_id",
                )
                .and_then(|mut st| st.query_row(params![&token_hash[..], now_ms], |row| row.get(0)).optional())
                .map_err(db_err)?;
            let Some(user) = user else { return Ok(None) };
            conn.prepare_cached("SELECT id, name, password_hash FROM users WHERE id = ?1")
                .and_then(|mut st| st.query_row([user], user_row).optional())
                .map_err(db_err)
        })
    }

    fn revoke_session(&mut self, token_hash: &[u8; 32], now_ms: i64) -> Result<bool> {
        self.write(|conn| {
            conn.prepare_cached("UPDATE sessions SET revoked_at = ?2 WHERE token_hash = ?1 AND revoked_at IS NULL")
                .and_then(|mut st| st.execute(params![&token_hash[..], now_ms]))
                .map(|n| n > 0)
                .map_err(db_err)
        })
    }

    fn create_room(
        &mut self,
        name: &str,
        kind: RoomKind,
        owner: UserId,
        owner_name: &str,
        now_ms: i64,
    ) -> Result<(RoomRecord, Delta)> {
        self.write(|conn| {
            let id: i64 = conn
                .prepare_cached(
                    "INSERT INTO rooms (name, kind, last_seq, created_by, created_at)
                     VALUES (?1, ?2, 1, ?3, ?4) RETURNING id",
                )
                .and_then(|mut st| st.query_row(params![name, kind.0, to_db(owner), now_ms], |row| row.get(0)))
                .map_err(db_err)?;
            conn.prepare_cached(
                "INSERT INTO room_members (room_id, user_id, role, muted, joined_at)
                 VALUES (?1, ?2, 'owner', 0, ?3)",
            )
            .and_then(|mut st| st.execute(params![id, to_db(owner), now_ms]))
            .map_err(db_err)?;
            let (room, delta) = crate::created_room(from_db(id), name, kind, owner, owner_name, now_ms);
            insert_delta(conn, &delta, None)?;
            Ok((room, delta))
        })
    }

    fn room(&mut self, room: RoomId) -> Result<Option<RoomRecord>> {
        self.conn
            .prepare_cached("SELECT id, name, kind, last_seq FROM rooms WHERE id = ?1")
            .and_then(|mut st| st.query_row([to_db(room)], room_row).optional())
            .map_err(db_err)
    }

    fn join_room(&mut self, room: RoomId, user: UserId, user_name: &str, now_ms: i64) -> Result<Option<Delta>> {
        self.write(|conn| {
            let added = conn
                .prepare_cached(
                    "INSERT INTO room_members (room_id, user_id, role, muted, joined_at)
                     SELECT id, ?2, 'member', 0, ?3 FROM rooms WHERE id = ?1
                     ON CONFLICT (room_id, user_id) DO NOTHING",
                )
                .and_then(|mut st| st.execute(params![to_db(room), to_db(user), now_ms]))
                .map_err(db_err)?;
            if added == 0 {
                return if exists(conn, room)? { Ok(None) } else { Err(StoreError::NotFound(format!("room {room}"))) };
            }
            match membership_delta(conn, room, DeltaKind::JOIN, user, user_name, now_ms)? {
                Some(delta) => Ok(Some(delta)),
                None => Err(StoreError::NotFound(format!("room {room}"))),
            }
        })
    }

    fn leave_room(&mut self, room: RoomId, user: UserId, user_name: &str, now_ms: i64) -> Result<Delta> {
        self.write(|conn| {
            let removed = conn
                .prepare_cached("DELETE FROM room_members WHERE room_id = ?1 AND user_id = ?2")
                .and_then(|mut st| st.execute(params![to_db(room), to_db(user)]))
                .map_err(db_err)?;
            if removed == 0 {
                return Err(StoreError::NotMember(room));
            }
            membership_delta(conn, room, DeltaKind::LEAVE, user, user_name, now_ms)?.ok_or(StoreError::NotMember(room))
        })
    }

    fn rooms_of_user(&mut self, user: UserId) -> Result<Vec<RoomRecord>> {
        self.conn
            .prepare_cached(
                "SELECT r.id, r.name, r.kind, r.last_seq FROM room_members m
                 JOIN rooms r ON r.id = m.room_id WHERE m.user_id = ?1 ORDER BY r.id",
            )
            .and_then(|mut st| st.query_map([to_db(user)], room_row)?.collect())
            .map_err(db_err)
    }

    fn is_member(&mut self, room: RoomId, user: UserId) -> Result<bool> {
        is_member(&self.conn, room, user)
    }

    fn members(&mut self, room: RoomId, after_user: UserId, limit: u32) -> Result<Vec<MemberRecord>> {
        self.conn
            .prepare_cached(
                "SELECT m.user_id, u.name, m.role, m.muted FROM room_members m
                 JOIN users u ON u.id = m.user_id
                 WHERE m.room_id = ?1 AND m.user_id > ?2 ORDER BY m.user_id LIMIT ?3",
            )
            .and_then(|mut st| {
                st.query_map(params![to_db(room), to_db(after_user), limit], |row| {
                    Ok(MemberRecord {
                        user_id: from_db(row.get(0)?),
                        name: row.get(1)?,
                        role: row.get(2)?,
                        muted: row.get(3)?,
                    })
                })?
                .collect()
            })
            .map_err(db_err)
    }

    fn append_posts(&mut self, posts: &[NewPost]) -> Result<Vec<PostOutcome>> {
        if posts.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|conn| {
            let mut membership: HashMap<(RoomId, UserId), bool> = HashMap::new();
            let mut heads: HashMap<RoomId, u64> = HashMap::new();
            let mut probes = Vec::with_capacity(posts.len());
            for post in posts {
                let member = match membership.get(&(post.room, post.author_id)) {
                    Some(member) => *member,
                    None => {
                        let member = is_member(conn, post.room, post.author_id)?;
                        membership.insert((post.room, post.author_id), member);
                        member
                    }
                };
                if !member {
                    probes.push(Probe::default());
                    continue;
                }
                if let Entry::Vacant(slot) = heads.entry(post.room) {
                    if let Some(head) = head_of(conn, post.room)? {
                        slot.insert(head);
                    }
                }
                let existing = if post.idempotency_key.is_empty() {
                    None
                } else {
                    conn.prepare_cached(
                        "SELECT seq, created_at FROM deltas
                         WHERE room_id = ?1 AND author_id = ?2 AND idempotency_key = ?3",
                    )
                    .and_then(|mut st| {
                        st.query_row(params![to_db(post.room), to_db(post.author_id), post.idempotency_key], |row| {
                            Ok((from_db(row.get(0)?), row.get(1)?))
                        })
                        .optional()
                    })
                    .map_err(db_err)?
                };
                probes.push(Probe { member, existing });
            }
            let plan = batch::plan(posts, &probes, &heads);
            for (outcome, post) in plan.outcomes.iter().zip(posts) {
                if let PostOutcome::Inserted(delta) = outcome {
                    let key = Some(post.idempotency_key.as_str()).filter(|k| !k.is_empty());
                    insert_delta(conn, delta, key)?;
                }
            }
            for (room, head) in &plan.heads {
                conn.prepare_cached("UPDATE rooms SET last_seq = ?2 WHERE id = ?1")
                    .and_then(|mut st| st.execute(params![to_db(*room), to_db(*head)]))
                    .map_err(db_err)?;
            }
            Ok(plan.outcomes)
        })
    }

    fn deltas_after(&mut self, room: RoomId, after: u64, limit: u32) -> Result<Vec<Delta>> {
        self.conn
            .prepare_cached(
                "SELECT d.seq, d.kind, d.author_id, u.name, d.created_at, d.body FROM deltas d
                 JOIN users u ON u.id = d.author_id
                 WHERE d.room_id = ?1 AND d.seq > ?2 ORDER BY d.seq LIMIT ?3",
            )
            .and_then(|mut st| {
                st.query_map(params![to_db(room), to_db(after), limit], |row| {
                    Ok(Delta {
                        room,
                        seq: from_db(row.get(0)?),
                        kind: DeltaKind(row.get(1)?),
                        author_id: from_db(row.get(2)?),
                        author: row.get(3)?,
                        ts_ms: row.get(4)?,
                        text: row.get(5)?,
                    })
                })?
                .collect()
            })
            .map_err(db_err)
    }
}

fn is_member(conn: &Connection, room: RoomId, user: UserId) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM room_members WHERE room_id = ?1 AND user_id = ?2")
        .and_then(|mut st| st.exists(params![to_db(room), to_db(user)]))
        .map_err(db_err)
}

fn exists(conn: &Connection, room: RoomId) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM rooms WHERE id = ?1").and_then(|mut st| st.exists([to_db(room)])).map_err(db_err)
}

fn head_of(conn: &Connection, room: RoomId) -> Result<Option<u64>> {
    conn.prepare_cached("SELECT last_seq FROM rooms WHERE id = ?1")
        .and_then(|mut st| st.query_row([to_db(room)], |row| row.get::<_, i64>(0)).optional())
        .map(|head| head.map(from_db))
        .map_err(db_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_creates_the_directory_and_sets_durable_pragmas() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nested/deeper/chime.db");
        let store = SqliteStore::open(&path).expect("open");
        assert!(path.exists());
        let pragma = |name: &str| -> String {
            store
                .conn
                .query_row(&format!("PRAGMA {name}"), [], |row| row.get::<_, rusqlite::types::Value>(0))
                .map(|v| format!("{v:?}"))
                .expect("pragma")
        };
        assert_eq!(pragma("journal_mode"), r#"Text("wal")"#);
        // 2 is FULL.
        assert_eq!(pragma("synchronous"), "Integer(2)");
        assert_eq!(pragma("foreign_keys"), "Integer(1)");
        assert_eq!(pragma("busy_timeout"), "Integer(30000)");
    }

    #[test]
    fn reopening_keeps_data_and_skips_applied_migrations() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite:{}", dir.path().join("chime.db").display());
        let user = crate::open(&url).expect("open").create_user("ada", "hash").expect("create");
        let mut again = crate::open(&url).expect("reopen");
        assert_eq!(again.user_by_name("ada").expect("lookup"), Some(user));
    }

    #[test]
    fn an_unusable_path_is_a_config_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = SqliteStore::open(file.join("chime.db")).err().expect("must fail");
        assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    }
}
