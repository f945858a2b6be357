//! The PostgreSQL store: one blocking `postgres::Client` per [`PgStore`], with every statement
//! prepared once at connect.
//!
//! Seqs come from `rooms.last_seq` under the room's row lock, taken in the transaction that
//! writes the deltas. Every write that appends to a room locks the room row first (a group commit
//! locks all its rooms in id order), so concurrent writers queue on the room instead of racing,
//! no two batches deadlock, and what a transaction reads after taking the lock (membership,
//! earlier idempotency keys) is everything committed before it.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, Config, NoTls, Row, Statement, Transaction};

use crate::batch::{self, Probe};
use crate::{
    from_db, now_ms, to_db, Delta, DeltaKind, MemberRecord, NewPost, NewSession, PostOutcome, Result, RoomId, RoomKind,
    RoomRecord, Store, StoreError, UserId, UserRecord,
};

/// The embedded migrations (`embedded::embedded::migrations::runner()`), private to this module.
mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// Connect timeout when the URL names none: an unreachable database must fail start-up, not
/// hang it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Key of the session advisory lock that serializes migrations between connections (workers of
/// one daemon, or several daemons sharing a database).
const MIGRATION_LOCK_KEY: i64 = 0x6368_696d_6500_0001;

/// Every statement the store runs, prepared once per connection.
struct Statements {
    create_user: Statement,
    user_by_name: Statement,
    user_by_id: Statement,
    create_session: Statement,
    touch_session: Statement,
    revoke_session: Statement,
    create_room: Statement,
    add_member: Statement,
    remove_member: Statement,
    room: Statement,
    bump_room: Statement,
    insert_delta: Statement,
    rooms_of_user: Statement,
    is_member: Statement,
    members: Statement,
    lock_rooms: Statement,
    probe_posts: Statement,
    write_posts: Statement,
    deltas_after: Statement,
}

impl Statements {
    fn prepare(client: &mut Client) -> std::result::Result<Self, postgres::Error> {
        Ok(Statements {
            create_user: client
                .prepare("INSERT INTO users (name, password_hash, created_at) VALUES ($1, $2, $3) RETURNING id")?,
            user_by_name: client.prepare("SELECT id, name, password_hash FROM users WHERE name = $1")?,
            user_by_id: client.prepare("SELECT id, name, password_hash FROM users WHERE id = $1")?,
            create_session: client.prepare(
                "INSERT INTO sessions (user_id, token_hash, ip, user_agent, created_at, last_used_at)
                 VALUES ($1, $2, $3, $4, $5, $5)",
            )?,
            touch_session: client.prepare(
                "UPDATE sessions SET last_used_at = $2
                 WHERE token_hash = $1 AND revoked_at IS NULL RETURNING user_id",
            )?,
            revoke_session: client
                .prepare("UPDATE sessions SET revoked_at = $2 WHERE token_hash = $1 AND revoked_at IS NULL")?,
            create_room: client.prepare(
                "INSERT INTO rooms (name, kind, last_seq, created_by, created_at)
                 VALUES ($1, $2, 1, $3, $4) RETURNING id",
            )?,
            add_member: client.prepare(
                "INSERT INTO room_members (room_id, user_id, role, muted, joined_at)
                 VALUES ($1, $2, $3, FALSE, $4) ON CONFLICT (room_id, user_id) DO NOTHING",
            )?,
            remove_member: client.prepare("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")?,
            room: client.prepare("SELECT id, name, kind, last_seq FROM rooms WHERE id = $1")?,
            bump_room: client.prepare("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq")?,
            insert_delta: client.prepare(
                "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at, idempotency_key)
                 VALUES ($1, $2, $3, $4, $5, $6, NULL)",
            )?,
            rooms_of_user: client.prepare(
                "SELECT r.id, r.name, r.kind, r.last_seq FROM room_members m
                 JOIN rooms r ON r.id = m.room_id WHERE m.user_id = $1 ORDER BY r.id",
            )?,
            is_member: client.prepare("SELECT 1 FROM room_members WHERE room_id = $1 AND user_id = $2")?,
            members: client.prepare(
                "SELECT m.user_id, u.name, m.role, m.muted FROM room_members m
                 JOIN users u ON u.id = m.user_id
                 WHERE m.room_id = $1 AND m.user_id > $2 ORDER BY m.user_id LIMIT $3",
            )?,
            // ORDER BY under FOR UPDATE locks the rows in id order: two batches sharing rooms
            // queue instead of deadlocking.
            lock_rooms: client.prepare("SELECT id, last_seq FROM rooms WHERE id = ANY($1) ORDER BY id FOR UPDATE")?,
            // One row per post, in input order: is the author a member, and the delta an earlier
            // post with the same key wrote, if any (a NULL key matches nothing).
            probe_posts: client.prepare(
                "SELECT m.user_id IS NOT NULL, d.seq, d.created_at
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]) WITH ORDINALITY
                      AS p(room_id, author_id, idem, ord)
                 LEFT JOIN room_members m ON m.room_id = p.room_id AND m.user_id = p.author_id
                 LEFT JOIN deltas d ON d.room_id = p.room_id AND d.author_id = p.author_id
                                   AND d.idempotency_key = p.idem
                 ORDER BY p.ord",
            )?,
            // Moves the heads and inserts every new delta in one round trip. No ON CONFLICT: the
            // room locks make a concurrent duplicate impossible, and skipping a row would leave a
            // gap in the log, so a violation must abort the batch instead.
            write_posts: client.prepare(
                "WITH heads AS (
                     UPDATE rooms r SET last_seq = h.last_seq
                     FROM UNNEST($1::bigint[], $2::bigint[]) AS h(id, last_seq) WHERE r.id = h.id
                 )
                 INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at, idempotency_key)
                 SELECT room_id, seq, $3::smallint, author_id, body, created_at, idem
                 FROM UNNEST($4::bigint[], $5::bigint[], $6::bigint[], $7::text[], $8::bigint[], $9::text[])
                      AS p(room_id, seq, author_id, body, created_at, idem)",
            )?,
            deltas_after: client.prepare(
                "SELECT d.seq, d.kind, d.author_id, u.name, d.created_at, d.body FROM deltas d
                 JOIN users u ON u.id = d.author_id
                 WHERE d.room_id = $1 AND d.seq > $2 ORDER BY d.seq LIMIT $3",
            )?,
        })
    }
}

/// The PostgreSQL store: one connection and its prepared statements.
pub struct PgStore {
    /// The connection.
    client: Client,
    /// Statements prepared on `client`.
    st: Statements,
}

impl PgStore {
    /// Connects to `url` (`postgres://USER@HOST:PORT/DB`, no TLS), applies pending migrations
    /// and prepares the store's statements.
    pub fn connect(url: &str) -> Result<Self> {
        let mut config = Config::from_str(url).map_err(|e| StoreError::Config(format!("bad PostgreSQL URL: {e:?}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let mut client = config.connect(NoTls).map_err(|e| {
            // The caller reports this error; logging it here too would print it twice.
            log::debug!("cannot connect to PostgreSQL: {e:?}");
            StoreError::Database(format!("cannot connect to PostgreSQL: {}", describe(&e)))
        })?;
        // The trait promises durable commits whatever the server's default is.
        client.batch_execute("SET synchronous_commit = on").map_err(pg_err)?;
        migrate(&mut client)?;
        let st = Statements::prepare(&mut client).map_err(pg_err)?;
        Ok(PgStore { client, st })
    }
}

/// Applies pending migrations while holding an advisory lock, so connections opened together
/// do not race to create the same tables.
fn migrate(client: &mut Client) -> Result<()> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY]).map_err(pg_err)?;
    let outcome = embedded::migrations::runner().run(client).map_err(|e| {
        log::error!("PostgreSQL migration failed: {e:?}");
        StoreError::Migration(e.to_string())
    });
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]).map_err(pg_err);
    outcome.and(unlocked).map(drop)
}

/// The useful part of a PostgreSQL error (its Display alone says only "db error").
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        // postgres' Display stops at "error connecting to server"; the cause says why.
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Maps a PostgreSQL error: a unique violation is a `Conflict`, a missing referenced row
/// `NotFound`, anything else a retryable `Database` error.
fn pg_err(e: postgres::Error) -> StoreError {
    match e.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StoreError::Conflict(describe(&e)),
        Some(code) if *code == SqlState::FOREIGN_KEY_VIOLATION => StoreError::NotFound(describe(&e)),
        _ => {
            log::warn!("postgres: {e:?}");
            StoreError::Database(describe(&e))
        }
    }
}

/// A kind code as stored (SMALLINT) back to its wire byte.
fn code(v: i16) -> Result<u8> {
    u8::try_from(v).map_err(|_| StoreError::Database(format!("kind code {v} out of range")))
}

fn user_row(row: &Row) -> UserRecord {
    UserRecord { id: from_db(row.get(0)), name: row.get(1), password_hash: row.get(2) }
}

fn room_row(row: &Row) -> Result<RoomRecord> {
    Ok(RoomRecord {
        id: from_db(row.get(0)),
        name: row.get(1),
        kind: RoomKind(code(row.get(2))?),
        last_seq: from_db(row.get(3)),
    })
}

impl PgStore {
    /// Appends a membership delta with the room's next seq (taking the room's row lock), or
    /// `None` when the room does not exist.
    fn membership_delta(
        st: &Statements,
        tx: &mut Transaction<'_>,
        room: RoomId,
        kind: DeltaKind,
        user: UserId,
        user_name: &str,
        now_ms: i64,
    ) -> Result<Option<Delta>> {
        let Some(row) = tx.query_opt(&st.bump_room, &[&to_db(room)]).map_err(pg_err)? else {
            return Ok(None);
        };
        let delta = Delta {
            room,
            seq: from_db(row.get(0)),
            kind,
            author_id: user,
            author: user_name.into(),
            ts_ms: now_ms,
            text: String::new(),
        };
        tx.execute(
            &st.insert_delta,
            &[&to_db(room), &to_db(delta.seq), &i16::from(kind.0), &to_db(user), &delta.text, &now_ms],
        )
        .map_err(pg_err)?;
        Ok(Some(delta))
    }
}

impl Store for PgStore {
    fn create_user(&mut self, name: &str, password_hash: &str) -> Result<UserRecord> {
        let row = self.client.query_one(&self.st.create_user, &[&name, &password_hash, &now_ms()]).map_err(pg_err)?;
        Ok(UserRecord { id: from_db(row.get(0)), name: name.into(), password_hash: password_hash.into() })
    }

    fn user_by_name(&mut self, name: &str) -> Result<Option<UserRecord>> {
        let row = self.client.query_opt(&self.st.user_by_name, &[&name]).map_err(pg_err)?;
        Ok(row.as_ref().map(user_row))
    }

    fn create_session(&mut self, session: &NewSession) -> Result<()> {
        self.client
            .execute(
                &self.st.create_session,
                &[&to_db(session.user_id), &&session.token_hash[..], &session.ip, &session.user_agent, &session.now_ms],
            )
            .map(drop)
            .map_err(pg_err)
    }

    fn session_user(&mut self, token_hash: &[u8; 32], now_ms: i64) -> Result<Option<UserRecord>> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let Some(session) = tx.query_opt(&self.st.touch_session, &[&&token_hash[..], &now_ms]).map_err(pg_err)? else {
            return Ok(None);
        };
        let user_id: i64 = session.get(0);
        let user = tx.query_opt(&self.st.user_by_id, &[&user_id]).map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        Ok(user.as_ref().map(user_row))
    }

    fn revoke_session(&mut self, token_hash: &[u8; 32], now_ms: i64) -> Result<bool> {
        self.client.execute(&self.st.revoke_session, &[&&token_hash[..], &now_ms]).map(|n| n > 0).map_err(pg_err)
    }

    fn create_room(
        &mut self,
        name: &str,
        kind: RoomKind,
        owner: UserId,
        owner_name: &str,
        now_ms: i64,
    ) -> Result<(RoomRecord, Delta)> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let row =
            tx.query_one(&self.st.create_room, &[&name, &i16::from(kind.0), &to_db(owner), &now_ms]).map_err(pg_err)?;
        let id: i64 = row.get(0);
        tx.execute(&self.st.add_member, &[&id, &to_db(owner), &"owner", &now_ms]).map_err(pg_err)?;
        tx.execute(
            &self.st.insert_delta,
            &[&id, &1_i64, &i16::from(DeltaKind::CREATE.0), &to_db(owner), &name, &now_ms],
        )
        .map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        Ok(crate::created_room(from_db(id), name, kind, owner, owner_name, now_ms))
    }

    fn room(&mut self, room: RoomId) -> Result<Option<RoomRecord>> {
        let row = self.client.query_opt(&self.st.room, &[&to_db(room)]).map_err(pg_err)?;
        row.as_ref().map(room_row).transpose()
    }

    fn join_room(&mut self, room: RoomId, user: UserId, user_name: &str, now_ms: i64) -> Result<Option<Delta>> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        // The seq first: it takes the room's lock (the order every room write follows) and tells
        // whether the room exists. Dropping the transaction undoes it when nothing is joined.
        let Some(delta) = Self::membership_delta(&self.st, &mut tx, room, DeltaKind::JOIN, user, user_name, now_ms)?
        else {
            return Err(StoreError::NotFound(format!("room {room}")));
        };
        let added =
            tx.execute(&self.st.add_member, &[&to_db(room), &to_db(user), &"member", &now_ms]).map_err(pg_err)?;
        if added == 0 {
            return Ok(None);
        }
        tx.commit().map_err(pg_err)?;
        Ok(Some(delta))
    }

    fn leave_room(&mut self, room: RoomId, user: UserId, user_name: &str, now_ms: i64) -> Result<Delta> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let delta = Self::membership_delta(&self.st, &mut tx, room, DeltaKind::LEAVE, user, user_name, now_ms)?
            .ok_or(StoreError::NotMember(room))?;
        let removed = tx.execute(&self.st.remove_member, &[&to_db(room), &to_db(user)]).map_err(pg_err)?;
        if removed == 0 {
            return Err(StoreError::NotMember(room));
        }
        tx.commit().map_err(pg_err)?;
        Ok(delta)
    }

    fn rooms_of_user(&mut self, user: UserId) -> Result<Vec<RoomRecord>> {
        let rows = self.client.query(&self.st.rooms_of_user, &[&to_db(user)]).map_err(pg_err)?;
        rows.iter().map(room_row).collect()
    }

    fn is_member(&mut self, room: RoomId, user: UserId) -> Result<bool> {
        let row = self.client.query_opt(&self.st.is_member, &[&to_db(room), &to_db(user)]).map_err(pg_err)?;
        Ok(row.is_some())
    }

    fn members(&mut self, room: RoomId, after_user: UserId, limit: u32) -> Result<Vec<MemberRecord>> {
        let rows = self
            .client
            .query(&self.st.members, &[&to_db(room), &to_db(after_user), &i64::from(limit)])
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|row| MemberRecord {
                user_id: from_db(row.get(0)),
                name: row.get(1),
                role: row.get(2),
                muted: row.get(3),
            })
            .collect())
    }

    fn append_posts(&mut self, posts: &[NewPost]) -> Result<Vec<PostOutcome>> {
        if posts.is_empty() {
            return Ok(Vec::new());
        }
        let rooms: Vec<i64> = posts.iter().map(|p| to_db(p.room)).collect::<BTreeSet<_>>().into_iter().collect();
        let post_rooms: Vec<i64> = posts.iter().map(|p| to_db(p.room)).collect();
        let authors: Vec<i64> = posts.iter().map(|p| to_db(p.author_id)).collect();
        let keys: Vec<Option<&str>> =
            posts.iter().map(|p| Some(p.idempotency_key.as_str()).filter(|k| !k.is_empty())).collect();

        let mut tx = self.client.transaction().map_err(pg_err)?;
        let heads: HashMap<RoomId, u64> = tx
            .query(&self.st.lock_rooms, &[&rooms])
            .map_err(pg_err)?
            .iter()
            .map(|row| (from_db(row.get(0)), from_db(row.get(1))))
            .collect();
        let probes: Vec<Probe> = tx
            .query(&self.st.probe_posts, &[&post_rooms, &authors, &keys])
            .map_err(pg_err)?
            .iter()
            .map(|row| {
                let seq: Option<i64> = row.get(1);
                let ts: Option<i64> = row.get(2);
                Probe { member: row.get(0), existing: seq.zip(ts).map(|(seq, ts)| (from_db(seq), ts)) }
            })
            .collect();
        if probes.len() != posts.len() {
            return Err(StoreError::Database(format!(
                "probe returned {} rows for {} posts",
                probes.len(),
                posts.len()
            )));
        }
        let plan = batch::plan(posts, &probes, &heads);

        let (head_rooms, head_seqs): (Vec<i64>, Vec<i64>) =
            plan.heads.iter().map(|(room, head)| (to_db(*room), to_db(*head))).unzip();
        let mut rows = InsertColumns::default();
        for (outcome, key) in plan.outcomes.iter().zip(&keys) {
            if let PostOutcome::Inserted(delta) = outcome {
                rows.push(delta, *key);
            }
        }
        if !rows.room.is_empty() {
            tx.execute(
                &self.st.write_posts,
                &[
                    &head_rooms,
                    &head_seqs,
                    &i16::from(DeltaKind::MESSAGE.0),
                    &rows.room,
                    &rows.seq,
                    &rows.author,
                    &rows.body,
                    &rows.created_at,
                    &rows.key,
                ],
            )
            .map_err(pg_err)?;
        }
        tx.commit().map_err(pg_err)?;
        Ok(plan.outcomes)
    }

    fn deltas_after(&mut self, room: RoomId, after: u64, limit: u32) -> Result<Vec<Delta>> {
        let rows = self
            .client
            .query(&self.st.deltas_after, &[&to_db(room), &to_db(after), &i64::from(limit)])
            .map_err(pg_err)?;
        rows.iter()
            .map(|row| {
                Ok(Delta {
                    room,
                    seq: from_db(row.get(0)),
                    kind: DeltaKind(code(row.get(1))?),
                    author_id: from_db(row.get(2)),
                    author: row.get(3),
                    ts_ms: row.get(4),
                    text: row.get(5),
                })
            })
            .collect()
    }
}

/// The new deltas of a batch as column arrays, for one `UNNEST` insert.
#[derive(Default)]
struct InsertColumns<'a> {
    room: Vec<i64>,
    seq: Vec<i64>,
    author: Vec<i64>,
    body: Vec<&'a str>,
    created_at: Vec<i64>,
    key: Vec<Option<&'a str>>,
}

impl<'a> InsertColumns<'a> {
    fn push(&mut self, delta: &'a Delta, key: Option<&'a str>) {
        self.room.push(to_db(delta.room));
        self.seq.push(to_db(delta.seq));
        self.author.push(to_db(delta.author_id));
        self.body.push(&delta.text);
        self.created_at.push(delta.ts_ms);
        self.key.push(key);
    }
}
