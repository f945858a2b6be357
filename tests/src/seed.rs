//! Bulk data for tests that need a user in thousands of rooms: written straight into a running
//! daemon's database with one SQL statement per table, where creating them through the protocol
//! would take one durable transaction (an fsync) per room.
//!
//! The rows are exactly what `CREATE_ROOM` writes (the room at head 1, its owner as the only
//! member, its `CREATE` delta), so the daemon cannot tell them apart. The daemon keeps no room
//! state in memory for users who are not connected, so rows added while it runs are seen at the
//! user's next login.

use anyhow::{Context, Result};

/// Where a daemon's data lives: its SQLite file or its PostgreSQL URL.
#[derive(Debug, Clone)]
pub enum Database {
    /// The embedded store's file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database URL.
    Postgres(String),
}

/// Creates `count` rooms owned by `owner`, named `{prefix}{n}` for n in 1..=count; returns their
/// ids, ascending.
pub fn rooms(db: &Database, owner: u64, count: u32, prefix: &str) -> Result<Vec<u64>> {
    let owner = i64::try_from(owner).context("user id out of range")?;
    let count = i64::from(count);
    let ids: Vec<i64> = match db {
        Database::Sqlite(path) => {
            let mut conn = rusqlite::Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
            conn.busy_timeout(std::time::Duration::from_secs(30))?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let before: i64 = tx.query_row("SELECT coalesce(max(id), 0) FROM rooms", [], |r| r.get(0))?;
            tx.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
                 INSERT INTO rooms (name, kind, last_seq, created_by, created_at)
                 SELECT ?3 || i, 1, 1, ?2, 0 FROM n",
                rusqlite::params![count, owner, prefix],
            )?;
            tx.execute(
                "INSERT INTO room_members (room_id, user_id, role, muted, joined_at)
                 SELECT id, ?2, 'owner', 0, 0 FROM rooms WHERE id > ?1",
                rusqlite::params![before, owner],
            )?;
            tx.execute(
                "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at)
                 SELECT id, 1, 1, ?2, name, 0 FROM rooms WHERE id > ?1",
                rusqlite::params![before, owner],
            )?;
            let ids = {
                let mut st = tx.prepare("SELECT id FROM rooms WHERE id > ?1 ORDER BY id")?;
                let ids = st.query_map([before], |r| r.get(0))?.collect::<rusqlite::Result<Vec<i64>>>()?;
                ids
            };
            tx.commit()?;
            ids
        }
        Database::Postgres(url) => {
            let mut client = postgres::Client::connect(url, postgres::NoTls).context("connecting to PostgreSQL")?;
            let mut tx = client.transaction()?;
            let rows = tx.query(
                "INSERT INTO rooms (name, kind, last_seq, created_by, created_at)
                 SELECT $3 || i, 1, 1, $2, 0 FROM generate_series(1, $1::bigint) AS i RETURNING id",
                &[&count, &owner, &prefix],
            )?;
            let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            tx.execute(
                "INSERT INTO room_members (room_id, user_id, role, muted, joined_at)
                 SELECT id, $2, 'owner', FALSE, 0 FROM UNNEST($1::bigint[]) AS id",
                &[&ids, &owner],
            )?;
            tx.execute(
                "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at)
                 SELECT r.id, 1, 1, $2, r.name, 0 FROM rooms r WHERE r.id = ANY($1)",
                &[&ids, &owner],
            )?;
            tx.commit()?;
            let mut ids = ids;
            ids.sort_unstable();
            ids
        }
    };
    Ok(ids.into_iter().filter_map(|id| u64::try_from(id).ok()).collect())
}

/// Adds `user` as a member of every room in `rooms` (no JOIN deltas: membership rows only, as if
/// the user had been a member from the start; fine for tests that only read).
pub fn memberships(db: &Database, user: u64, rooms: &[u64]) -> Result<()> {
    let user = i64::try_from(user).context("user id out of range")?;
    let rooms: Vec<i64> = rooms.iter().filter_map(|&r| i64::try_from(r).ok()).collect();
    match db {
        Database::Sqlite(path) => {
            let mut conn = rusqlite::Connection::open(path)?;
            conn.busy_timeout(std::time::Duration::from_secs(30))?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut st = tx.prepare(
                    "INSERT OR IGNORE INTO room_members (room_id, user_id, role, muted, joined_at)
                     VALUES (?1, ?2, 'member', 0, 0)",
                )?;
                for room in &rooms {
                    st.execute(rusqlite::params![room, user])?;
                }
            }
            tx.commit()?;
        }
        Database::Postgres(url) => {
            let mut client = postgres::Client::connect(url, postgres::NoTls)?;
            client.execute(
                "INSERT INTO room_members (room_id, user_id, role, muted, joined_at)
                 SELECT id, $2, 'member', FALSE, 0 FROM UNNEST($1::bigint[]) AS id ON CONFLICT DO NOTHING",
                &[&rooms, &user],
            )?;
        }
    }
    Ok(())
}

/// Adds `count` new users (named `{prefix}{n}`, unable to log in: their password hash is a
/// placeholder) as members of `server`, in one transaction. The member count follows (on
/// PostgreSQL the per-row trigger is bypassed for the bulk insert and the count set once).
pub fn server_members(db: &Database, server: u64, count: u32, prefix: &str) -> Result<()> {
    let server = i64::try_from(server).context("server id out of range")?;
    let count = i64::from(count);
    match db {
        Database::Sqlite(path) => {
            let mut conn = rusqlite::Connection::open(path)?;
            conn.busy_timeout(std::time::Duration::from_secs(60))?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let before: i64 = tx.query_row("SELECT coalesce(max(id), 0) FROM users", [], |r| r.get(0))?;
            tx.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
                 INSERT INTO users (name, password_hash, created_at) SELECT ?2 || i, 'x', 0 FROM n",
                rusqlite::params![count, prefix],
            )?;
            tx.execute(
                "INSERT INTO server_members (server_id, user_id, role, joined_at)
                 SELECT ?2, id, 'member', 0 FROM users WHERE id > ?1",
                rusqlite::params![before, server],
            )?;
            tx.commit()?;
        }
        Database::Postgres(url) => {
            let mut client = postgres::Client::connect(url, postgres::NoTls).context("connecting to PostgreSQL")?;
            let mut tx = client.transaction()?;
            // One count update instead of a million: triggers off for this transaction's inserts.
            tx.batch_execute("SET LOCAL session_replication_role = replica")?;
            let before: i64 = tx.query_one("SELECT coalesce(max(id), 0) FROM users", &[])?.get(0);
            tx.execute(
                "INSERT INTO users (name, password_hash, created_at)
                 SELECT $2 || i, 'x', 0 FROM generate_series(1, $1::bigint) AS i",
                &[&count, &prefix],
            )?;
            tx.execute(
                "INSERT INTO server_members (server_id, user_id, role, joined_at)
                 SELECT $2, id, 'member', 0 FROM users WHERE id > $1",
                &[&before, &server],
            )?;
            tx.execute(
                "UPDATE servers SET member_count = (SELECT count(*) FROM server_members WHERE server_id = $1)
                 WHERE id = $1",
                &[&server],
            )?;
            tx.commit()?;
            client.batch_execute("ANALYZE users; ANALYZE server_members")?;
        }
    }
    Ok(())
}

/// Creates `count` servers owned by `owner`, each with its `general` channel (head 1, its
/// `CREATE` delta), as `CREATE_SERVER` writes them; returns their ids.
pub fn servers(db: &Database, owner: u64, count: u32) -> Result<Vec<u64>> {
    let owner = i64::try_from(owner).context("user id out of range")?;
    let count = i64::from(count);
    let statements = [
        "INSERT INTO servers (name, description, public, owner_id, member_cap, created_at)
         SELECT 'server' || i, '', TRUE, {owner}, 1000000, 0 FROM {series}",
        "INSERT INTO server_members (server_id, user_id, role, joined_at)
         SELECT id, {owner}, 'owner', 0 FROM servers WHERE id > {before}",
        "INSERT INTO rooms (name, kind, last_seq, created_by, created_at, server_id)
         SELECT 'general', 5, 1, {owner}, 0, id FROM servers WHERE id > {before}",
        "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at)
         SELECT r.id, 1, 1, {owner}, 'general', 0 FROM rooms r WHERE r.server_id > {before}",
    ];
    let run = |before: i64, series: &str| -> Vec<String> {
        statements
            .iter()
            .map(|s| {
                s.replace("{owner}", &owner.to_string())
                    .replace("{before}", &before.to_string())
                    .replace("{series}", series)
            })
            .collect()
    };
    let ids: Vec<i64> = match db {
        Database::Sqlite(path) => {
            let mut conn = rusqlite::Connection::open(path)?;
            conn.busy_timeout(std::time::Duration::from_secs(60))?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let before: i64 = tx.query_row("SELECT coalesce(max(id), 0) FROM servers", [], |r| r.get(0))?;
            let series = format!(
                "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) SELECT i FROM n)"
            );
            for sql in run(before, &series) {
                tx.execute(&sql, [])?;
            }
            let ids = {
                let mut st = tx.prepare("SELECT id FROM servers WHERE id > ?1 ORDER BY id")?;
                let ids = st.query_map([before], |r| r.get(0))?.collect::<rusqlite::Result<Vec<i64>>>()?;
                ids
            };
            tx.commit()?;
            ids
        }
        Database::Postgres(url) => {
            let mut client = postgres::Client::connect(url, postgres::NoTls)?;
            let mut tx = client.transaction()?;
            let before: i64 = tx.query_one("SELECT coalesce(max(id), 0) FROM servers", &[])?.get(0);
            for sql in run(before, &format!("generate_series(1, {count}) AS s(i)")) {
                tx.batch_execute(&sql)?;
            }
            let ids = tx
                .query("SELECT id FROM servers WHERE id > $1 ORDER BY id", &[&before])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            tx.commit()?;
            ids
        }
    };
    Ok(ids.into_iter().filter_map(|i| u64::try_from(i).ok()).collect())
}
