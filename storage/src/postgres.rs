//! The PostgreSQL store: one blocking `postgres::Client` per [`PgStore`], with every statement
//! prepared once at connect.
//!
//! Seqs come from `rooms.last_seq` under the room's row lock, taken in the transaction that
//! writes the deltas. Every write that appends to a room locks the room row first (a group commit
//! locks all its rooms in id order), so concurrent writers queue on the room instead of racing,
//! no two batches deadlock, and what a transaction reads after taking the lock (membership,
//! earlier idempotency keys) is everything committed before it.
//!
//! A lost connection is not repaired here: every call on it fails with
//! [`StoreError::Unavailable`], and the owner opens a new store once the server is back. The
//! connection is named `chime` in `pg_stat_activity` unless the URL sets `application_name`.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;

use postgres::error::SqlState;
use postgres::{Client, Config, NoTls, Row, Statement, Transaction};

use crate::actions::{self, Target, Verdict};
use crate::batch::{self, Probe};
use crate::partition::{self, PartitionRecord};
use crate::search;
use crate::{
    from_db, now_ms, to_db, ActionOutcome, DeltaRecord, DirectRoom, MemberRecord, MessageAction, MessageRecord,
    NewAction, NewPost, NewSession, OpenOptions, Order, Permissions, PostOutcome, RecordKind, Result,
    RoomDetailsRecord, RoomId, RoomKind, RoomRecord, Seq, SessionId, SessionLimits, SessionRecord, SharedStore, Store,
    StoreError, UserId, UserRecord,
};

/// The embedded migrations (`embedded::embedded::migrations::runner()`), private to this module.
mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// How the store's connections show in `pg_stat_activity` when the URL names nothing else.
const APPLICATION_NAME: &str = "chime";

/// Server errors (besides class 08, connection exception) that say the server cannot work right
/// now rather than that the statement is wrong: shutting down or starting up, out of disk, memory
/// or connection slots, failing I/O, or read-only (a standby, or a primary demoted during a
/// failover).
const UNAVAILABLE_STATES: [SqlState; 8] = [
    SqlState::ADMIN_SHUTDOWN,
    SqlState::CRASH_SHUTDOWN,
    SqlState::CANNOT_CONNECT_NOW,
    SqlState::DISK_FULL,
    SqlState::OUT_OF_MEMORY,
    SqlState::TOO_MANY_CONNECTIONS,
    SqlState::IO_ERROR,
    SqlState::READ_ONLY_SQL_TRANSACTION,
];

/// Key of the session advisory lock that serializes migrations between connections (workers of
/// one daemon, or several daemons sharing a database).
const MIGRATION_LOCK_KEY: i64 = 0x6368_696d_6500_0001;

/// Every statement the store runs, prepared once per connection.
struct Statements {
    create_user: Statement,
    user_by_name: Statement,
    user_by_id: Statement,
    create_session: Statement,
    session_by_token: Statement,
    touch_session: Statement,
    expire_session: Statement,
    list_sessions: Statement,
    revoke_sessions: Statement,
    lock_user: Statement,
    room_count: Statement,
    create_room: Statement,
    add_member: Statement,
    remove_member: Statement,
    room: Statement,
    bump_room: Statement,
    insert_delta: Statement,
    rooms_of_user: Statement,
    rooms_page: Statement,
    touch_sessions: Statement,
    is_member: Statement,
    room_details: Statement,
    members: Statement,
    lock_rooms: Statement,
    probe_posts: Statement,
    write_posts: Statement,
    deltas_after: Statement,
    ping: Statement,
    member_role: Statement,
    room_kind: Statement,
    direct_room: Statement,
    add_direct: Statement,
    lock_room: Statement,
    earlier_key: Statement,
    action_target: Statement,
    delta_time: Statement,
    insert_action: Statement,
    edit_state: Statement,
    delete_state: Statement,
    pin_state: Statement,
    unpin_state: Statement,
    react_user: Statement,
    react_count: Statement,
    unreact_user: Statement,
    unreact_count: Statement,
    messages_before: Statement,
    reactions_of: Statement,
    record_partitions: Statement,
    index_message: Statement,
    unindex_message: Statement,
    deltas_page_asc: Statement,
    deltas_page_desc: Statement,
    partitions: Statement,
    reactions_in: Statement,
}

/// The columns of a delta read with its author's name, in the order [`delta_row`] reads them.
const DELTA_COLUMNS: &str = "d.seq, d.kind, d.author_id, u.name, d.created_at, d.body, d.target";

/// The columns [`message_row`] reads, in its order, from `deltas d`, `users u` and
/// `message_state s`.
const MESSAGE_COLUMNS: &str = "d.seq, d.author_id, u.name, d.created_at, d.body, d.target, d.kind,
     s.text, s.edited_at, s.deleted_seq, s.pinned_seq";

/// The statement that merges rows of what new deltas add to their partitions, given as seven
/// column arrays from parameter `$first` on, into `delta_partitions`. `partition::summarize` never
/// gives two rows for one partition, which one upsert could not take.
fn record_partitions_sql(first: usize) -> String {
    let arrays: Vec<String> = (first..first + 7).map(|i| format!("${i}::bigint[]")).collect();
    format!(
        "INSERT INTO delta_partitions (room_id, part, first_seq, last_seq, first_ts, last_ts, count)
         SELECT * FROM UNNEST({})
         ON CONFLICT (room_id, part) DO UPDATE SET
             first_seq = LEAST(delta_partitions.first_seq, excluded.first_seq),
             last_seq = GREATEST(delta_partitions.last_seq, excluded.last_seq),
             first_ts = LEAST(delta_partitions.first_ts, excluded.first_ts),
             last_ts = GREATEST(delta_partitions.last_ts, excluded.last_ts),
             count = delta_partitions.count + excluded.count",
        arrays.join(", ")
    )
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
                 VALUES ($1, $2, $3, $4, $5, $5) RETURNING id",
            )?,
            // The row lock orders a login with a concurrent revocation of the same session: the
            // one that comes second sees what the first committed.
            session_by_token: client.prepare(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE token_hash = $1 AND revoked_at IS NULL FOR UPDATE"
            ))?,
            touch_session: client.prepare(
                "UPDATE sessions SET last_used_at = GREATEST(last_used_at, $2)
                 WHERE id = $1 AND revoked_at IS NULL RETURNING last_used_at",
            )?,
            expire_session: client.prepare("UPDATE sessions SET revoked_at = $2 WHERE id = $1")?,
            list_sessions: client.prepare(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = $1 AND revoked_at IS NULL ORDER BY id"
            ))?,
            revoke_sessions: client.prepare(
                "UPDATE sessions SET revoked_at = $3
                 WHERE user_id = $1 AND revoked_at IS NULL AND ($2::bigint IS NULL OR id = $2) RETURNING id",
            )?,
            // Serializes the membership changes of one user, so two joins into different rooms
            // (each holding only its own room's lock) cannot both pass the room cap. NO KEY: it
            // does not block the foreign-key checks of other inserts that name the user.
            lock_user: client.prepare("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")?,
            room_count: client.prepare("SELECT count(*) FROM room_members WHERE user_id = $1")?,
            create_room: client.prepare(
                "INSERT INTO rooms (name, kind, last_seq, created_by, created_at, part_size)
                 VALUES ($1, $2, 1, $3, $4, $5) RETURNING id",
            )?,
            add_member: client.prepare(
                "INSERT INTO room_members (room_id, user_id, role, muted, joined_at)
                 VALUES ($1, $2, $3, FALSE, $4) ON CONFLICT (room_id, user_id) DO NOTHING",
            )?,
            remove_member: client.prepare("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")?,
            room: client.prepare("SELECT id, name, kind, last_seq FROM rooms WHERE id = $1")?,
            bump_room: client
                .prepare("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq, part_size")?,
            insert_delta: client.prepare(
                "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at, idempotency_key)
                 VALUES ($1, $2, $3, $4, $5, $6, NULL)",
            )?,
            rooms_of_user: client.prepare(
                "SELECT r.id, r.name, r.kind, r.last_seq FROM room_members m
                 JOIN rooms r ON r.id = m.room_id WHERE m.user_id = $1 ORDER BY r.id",
            )?,
            rooms_page: client.prepare(
                "SELECT r.id, r.name, r.kind, r.last_seq FROM room_members m
                 JOIN rooms r ON r.id = m.room_id WHERE m.user_id = $1 AND m.room_id > $2
                 ORDER BY m.room_id LIMIT $3",
            )?,
            touch_sessions: client.prepare(
                "UPDATE sessions SET last_used_at = GREATEST(last_used_at, $2)
                 WHERE id = ANY($1) AND revoked_at IS NULL",
            )?,
            is_member: client.prepare("SELECT 1 FROM room_members WHERE room_id = $1 AND user_id = $2")?,
            room_details: client.prepare(
                "SELECT r.id, r.name, r.kind, r.last_seq, r.member_count, m.role FROM rooms r
                 LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = $2 WHERE r.id = $1",
            )?,
            members: client.prepare(
                "SELECT m.user_id, u.name, m.role, m.muted FROM room_members m
                 JOIN users u ON u.id = m.user_id
                 WHERE m.room_id = $1 AND m.user_id > $2 ORDER BY m.user_id LIMIT $3",
            )?,
            // ORDER BY under FOR UPDATE locks the rows in id order: two batches sharing rooms
            // queue instead of deadlocking.
            lock_rooms: client
                .prepare("SELECT id, last_seq, part_size, kind FROM rooms WHERE id = ANY($1) ORDER BY id FOR UPDATE")?,
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
            // Moves the heads, records the partitions, indexes the messages' words (rows whose
            // words are empty are not indexed) and inserts every new delta, in one round trip. No
            // ON CONFLICT on deltas: the room locks make a concurrent duplicate impossible, and
            // skipping a row would leave a gap in the log, so a violation must abort the batch.
            write_posts: client.prepare(&format!(
                "WITH heads AS (
                     UPDATE rooms r SET last_seq = h.last_seq
                     FROM UNNEST($1::bigint[], $2::bigint[]) AS h(id, last_seq) WHERE r.id = h.id
                 ), parts AS (
                     {}
                 ), indexed AS (
                     INSERT INTO message_search (room_id, seq, words)
                     SELECT room_id, seq, array_to_tsvector(string_to_array(words, ' '))
                     FROM UNNEST($11::bigint[], $12::bigint[], $17::text[]) AS w(room_id, seq, words)
                     WHERE words <> ''
                 )
                 INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at, idempotency_key)
                 SELECT room_id, seq, $3::smallint, author_id, body, created_at, idem
                 FROM UNNEST($11::bigint[], $12::bigint[], $13::bigint[], $14::text[], $15::bigint[], $16::text[])
                      AS p(room_id, seq, author_id, body, created_at, idem)",
                record_partitions_sql(4)
            ))?,
            deltas_after: client.prepare(&format!(
                "SELECT {DELTA_COLUMNS} FROM deltas d JOIN users u ON u.id = d.author_id
                 WHERE d.room_id = $1 AND d.seq > $2 ORDER BY d.seq LIMIT $3"
            ))?,
            ping: client.prepare("SELECT 1")?,
            member_role: client.prepare("SELECT role FROM room_members WHERE room_id = $1 AND user_id = $2")?,
            room_kind: client.prepare("SELECT kind FROM rooms WHERE id = $1")?,
            direct_room: client.prepare(
                "SELECT r.id, r.name, r.kind, r.last_seq FROM direct_rooms d JOIN rooms r ON r.id = d.room_id
                 WHERE d.user_lo = $1 AND d.user_hi = $2",
            )?,
            add_direct: client.prepare("INSERT INTO direct_rooms (user_lo, user_hi, room_id) VALUES ($1, $2, $3)")?,
            lock_room: client.prepare("SELECT last_seq, part_size, kind FROM rooms WHERE id = $1 FOR UPDATE")?,
            earlier_key: client.prepare(
                "SELECT seq, created_at FROM deltas WHERE room_id = $1 AND author_id = $2 AND idempotency_key = $3",
            )?,
            action_target: client.prepare(
                "SELECT d.kind, d.author_id, s.deleted_seq, s.pinned_seq,
                        (SELECT ru.delta_seq FROM reaction_users ru WHERE ru.room_id = d.room_id AND ru.seq = d.seq
                            AND ru.emoji = $3 AND ru.user_id = $4)
                 FROM deltas d LEFT JOIN message_state s ON s.room_id = d.room_id AND s.seq = d.seq
                 WHERE d.room_id = $1 AND d.seq = $2",
            )?,
            delta_time: client.prepare("SELECT created_at FROM deltas WHERE room_id = $1 AND seq = $2")?,
            insert_action: client.prepare(
                "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at, idempotency_key, target)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )?,
            edit_state: client.prepare(
                "INSERT INTO message_state (room_id, seq, text, edited_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (room_id, seq) DO UPDATE SET text = excluded.text, edited_at = excluded.edited_at",
            )?,
            delete_state: client.prepare(
                "INSERT INTO message_state (room_id, seq, deleted_seq) VALUES ($1, $2, $3)
                 ON CONFLICT (room_id, seq) DO UPDATE SET deleted_seq = excluded.deleted_seq, text = NULL",
            )?,
            pin_state: client.prepare(
                "INSERT INTO message_state (room_id, seq, pinned_seq) VALUES ($1, $2, $3)
                 ON CONFLICT (room_id, seq) DO UPDATE SET pinned_seq = excluded.pinned_seq",
            )?,
            unpin_state: client
                .prepare("UPDATE message_state SET pinned_seq = NULL WHERE room_id = $1 AND seq = $2")?,
            react_user: client.prepare(
                "INSERT INTO reaction_users (room_id, seq, emoji, user_id, delta_seq) VALUES ($1, $2, $3, $4, $5)",
            )?,
            react_count: client.prepare(
                "INSERT INTO reactions (room_id, seq, emoji, count) VALUES ($1, $2, $3, 1)
                 ON CONFLICT (room_id, seq, emoji) DO UPDATE SET count = reactions.count + 1",
            )?,
            unreact_user: client.prepare(
                "DELETE FROM reaction_users WHERE room_id = $1 AND seq = $2 AND emoji = $3 AND user_id = $4",
            )?,
            // One statement: the count goes down by one, and a count that reaches zero leaves no row.
            unreact_count: client.prepare(
                "WITH gone AS (
                     DELETE FROM reactions WHERE room_id = $1 AND seq = $2 AND emoji = $3 AND count = 1 RETURNING 1
                 )
                 UPDATE reactions SET count = count - 1
                 WHERE room_id = $1 AND seq = $2 AND emoji = $3 AND count > 1",
            )?,
            messages_before: client.prepare(&format!(
                "SELECT {MESSAGE_COLUMNS}
                 FROM deltas d JOIN users u ON u.id = d.author_id
                 LEFT JOIN message_state s ON s.room_id = d.room_id AND s.seq = d.seq
                 WHERE d.room_id = $1 AND d.seq < $2 AND d.kind IN (2, 9)
                 ORDER BY d.seq DESC LIMIT $3"
            ))?,
            reactions_of: client.prepare(
                "SELECT r.seq, r.emoji, r.count, EXISTS (SELECT 1 FROM reaction_users ru
                     WHERE ru.room_id = r.room_id AND ru.seq = r.seq AND ru.emoji = r.emoji AND ru.user_id = $4)
                 FROM reactions r WHERE r.room_id = $1 AND r.seq BETWEEN $2 AND $3 ORDER BY r.seq, r.emoji",
            )?,
            record_partitions: client.prepare(&record_partitions_sql(1))?,
            index_message: client.prepare(
                "INSERT INTO message_search (room_id, seq, words) VALUES ($1, $2, array_to_tsvector($3::text[]))
                 ON CONFLICT (room_id, seq) DO UPDATE SET words = excluded.words",
            )?,
            unindex_message: client.prepare("DELETE FROM message_search WHERE room_id = $1 AND seq = $2")?,
            // Both ends bound the scan: the page's seqs are known before it is read.
            deltas_page_asc: client.prepare(&format!(
                "SELECT {DELTA_COLUMNS} FROM deltas d JOIN users u ON u.id = d.author_id
                 WHERE d.room_id = $1 AND d.seq BETWEEN $2 AND $3 ORDER BY d.seq"
            ))?,
            deltas_page_desc: client.prepare(&format!(
                "SELECT {DELTA_COLUMNS} FROM deltas d JOIN users u ON u.id = d.author_id
                 WHERE d.room_id = $1 AND d.seq BETWEEN $2 AND $3 ORDER BY d.seq DESC"
            ))?,
            partitions: client.prepare(
                "SELECT part, first_seq, last_seq, first_ts, last_ts, count FROM delta_partitions
                 WHERE room_id = $1 ORDER BY part",
            )?,
            reactions_in: client.prepare(
                "SELECT r.seq, r.emoji, r.count, EXISTS (SELECT 1 FROM reaction_users ru
                     WHERE ru.room_id = r.room_id AND ru.seq = r.seq AND ru.emoji = r.emoji AND ru.user_id = $3)
                 FROM reactions r WHERE r.room_id = $1 AND r.seq = ANY($2) ORDER BY r.seq, r.emoji",
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
    /// The partition size of the rooms this store creates.
    partition_size: u64,
}

impl PgStore {
    /// [`PgStore::connect_with`] with default options.
    pub fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &OpenOptions::default())
    }

    /// Connects to `url` (`postgres://USER@HOST:PORT/DB`, no TLS), applies pending migrations
    /// and prepares the store's statements. `Unavailable` when the server cannot be reached or
    /// refuses connections for now; `Config` for a bad URL, bad credentials or a database that
    /// does not exist, which waiting will not fix.
    pub fn connect_with(url: &str, options: &OpenOptions) -> Result<Self> {
        let mut config = Config::from_str(url).map_err(|e| StoreError::Config(format!("bad PostgreSQL URL: {e:?}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        let mut client = config.connect(NoTls).map_err(connect_err)?;
        // The trait promises durable commits whatever the server's default is.
        client.batch_execute("SET synchronous_commit = on").map_err(pg_err)?;
        migrate(&mut client)?;
        let st = Statements::prepare(&mut client).map_err(pg_err)?;
        Ok(PgStore { client, st, partition_size: options.partition_size.max(1) })
    }
}

/// Applies the migrations up to `target` to the database at `url` (see [`crate::migrate_to`]).
pub(crate) fn migrate_to(url: &str, target: refinery::Target) -> Result<()> {
    let config = Config::from_str(url).map_err(|e| StoreError::Config(format!("bad PostgreSQL URL: {e:?}")))?;
    let mut client = config.connect(NoTls).map_err(connect_err)?;
    embedded::migrations::runner()
        .set_target(target)
        .run(&mut client)
        .map(drop)
        .map_err(|e| StoreError::Migration(e.to_string()))
}

/// Applies pending migrations while holding an advisory lock, so connections opened together
/// do not race to create the same tables.
fn migrate(client: &mut Client) -> Result<()> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY]).map_err(pg_err)?;
    let outcome = embedded::migrations::runner().run(client).map_err(|e| {
        log::debug!("PostgreSQL migration failed: {e:?}");
        match crate::migration_cause::<postgres::Error>(&e) {
            Some(cause) if is_unavailable(cause) => StoreError::Unavailable(describe(cause)),
            _ => StoreError::Migration(e.to_string()),
        }
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

/// Maps a PostgreSQL error and logs it at debug level (the owner of the store reports outages):
/// a lost connection or a server that cannot work right now is `Unavailable`, a unique violation
/// a `Conflict`, a missing referenced row `NotFound`, anything else `Database`.
fn pg_err(e: postgres::Error) -> StoreError {
    log::debug!("postgres: {e:?}");
    if is_unavailable(&e) {
        return StoreError::Unavailable(describe(&e));
    }
    match e.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StoreError::Conflict(describe(&e)),
        Some(code) if *code == SqlState::FOREIGN_KEY_VIOLATION => StoreError::NotFound(describe(&e)),
        _ => StoreError::Database(describe(&e)),
    }
}

/// Maps a failure to connect: `Config` when the server turned away these credentials or this
/// database name (waiting will not fix that), `Unavailable` otherwise (refused, unreachable,
/// timed out, starting up, out of connection slots).
fn connect_err(e: postgres::Error) -> StoreError {
    log::debug!("cannot connect to PostgreSQL: {e:?}");
    let message = format!("cannot connect to PostgreSQL: {}", describe(&e));
    match e.code() {
        Some(code) if code.code().starts_with("28") || *code == SqlState::INVALID_CATALOG_NAME => {
            StoreError::Config(message)
        }
        _ => StoreError::Unavailable(message),
    }
}

/// Whether an error says the server is out of reach or cannot work right now, rather than that
/// the statement was wrong.
fn is_unavailable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => code.code().starts_with("08") || UNAVAILABLE_STATES.contains(code),
        // No answer from the server at all: the connection itself failed (reset, refused, timed
        // out), which the client reports as an I/O error somewhere under this one.
        None => {
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                if c.is::<std::io::Error>() {
                    return true;
                }
                cause = c.source();
            }
            false
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

/// The columns [`session_row`] reads, in its order.
const SESSION_COLUMNS: &str = "id, user_id, ip, user_agent, created_at, last_used_at";

fn session_row(row: &Row) -> SessionRecord {
    SessionRecord {
        id: from_db(row.get(0)),
        user_id: from_db(row.get(1)),
        ip: row.get(2),
        user_agent: row.get(3),
        created_at_ms: row.get(4),
        last_used_at_ms: row.get(5),
    }
}

fn room_row(row: &Row) -> Result<RoomRecord> {
    Ok(RoomRecord {
        id: from_db(row.get(0)),
        name: row.get(1),
        kind: RoomKind(code(row.get(2))?),
        last_seq: from_db(row.get(3)),
    })
}

/// A delta of `room` from [`DELTA_COLUMNS`].
fn delta_row(room: RoomId, row: &Row) -> Result<DeltaRecord> {
    Ok(DeltaRecord {
        room,
        seq: from_db(row.get(0)),
        kind: RecordKind(code(row.get(1))?),
        author_id: from_db(row.get(2)),
        author: row.get(3),
        ts_ms: row.get(4),
        body: row.get(5),
        target: row.get::<_, Option<i64>>(6).map(from_db),
    })
}

/// A message in its current state (without its reactions) from [`MESSAGE_COLUMNS`].
fn message_row(row: &Row) -> MessageRecord {
    let deleted = row.get::<_, Option<i64>>(9).is_some();
    let edited: Option<String> = row.get(7);
    let is_reply = row.get::<_, i16>(6) == i16::from(RecordKind::REPLY.0);
    MessageRecord {
        seq: from_db(row.get(0)),
        author_id: from_db(row.get(1)),
        author: row.get(2),
        ts_ms: row.get(3),
        text: if deleted { None } else { Some(edited.unwrap_or_else(|| row.get(4))) },
        edited_ms: row.get(8),
        deleted,
        reply_to: if is_reply { row.get::<_, Option<i64>>(5).map(from_db) } else { None },
        pinned: row.get::<_, Option<i64>>(10).is_some(),
        reactions: Vec::new(),
    }
}

fn reaction_row(row: &Row) -> (i64, String, i64, bool) {
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// Partition rows as the seven column arrays [`record_partitions_sql`] takes.
#[derive(Default)]
struct PartitionColumns {
    room: Vec<i64>,
    part: Vec<i64>,
    first_seq: Vec<i64>,
    last_seq: Vec<i64>,
    first_ts: Vec<i64>,
    last_ts: Vec<i64>,
    count: Vec<i64>,
}

impl PartitionColumns {
    fn of(rows: &[PartitionRecord]) -> PartitionColumns {
        let mut c = PartitionColumns::default();
        for p in rows {
            c.room.push(to_db(p.room));
            c.part.push(to_db(p.part));
            c.first_seq.push(to_db(p.first_seq));
            c.last_seq.push(to_db(p.last_seq));
            c.first_ts.push(p.first_ts_ms);
            c.last_ts.push(p.last_ts_ms);
            c.count.push(to_db(p.count));
        }
        c
    }
}

/// Whether a room of this kind code has its messages indexed.
fn indexable(kind: i16) -> Result<bool> {
    Ok(search::indexable(RoomKind(code(kind)?)))
}

impl PgStore {
    /// Appends one delta's partition bookkeeping.
    fn record_partition(st: &Statements, tx: &mut Transaction<'_>, delta: &DeltaRecord, part_size: i64) -> Result<()> {
        let c = PartitionColumns::of(&partition::summarize([delta], |_| from_db(part_size)));
        tx.execute(
            &st.record_partitions,
            &[&c.room, &c.part, &c.first_seq, &c.last_seq, &c.first_ts, &c.last_ts, &c.count],
        )
        .map(drop)
        .map_err(pg_err)
    }

    /// Sets a message's words in the search index (removing it when the text has none).
    fn index_message(st: &Statements, tx: &mut Transaction<'_>, room: i64, seq: i64, text: &str) -> Result<()> {
        let words = search::words(text);
        if words.is_empty() {
            return tx.execute(&st.unindex_message, &[&room, &seq]).map(drop).map_err(pg_err);
        }
        tx.execute(&st.index_message, &[&room, &seq, &words]).map(drop).map_err(pg_err)
    }

    /// Refuses a read of a room by a user who is not a member (`NotFound` when there is no room).
    fn check_member(st: &Statements, tx: &mut Transaction<'_>, room: RoomId, user: UserId) -> Result<()> {
        let details = tx.query_opt(&st.room_details, &[&to_db(room), &to_db(user)]).map_err(pg_err)?;
        let Some(details) = details else { return Err(StoreError::NotFound(format!("room {room}"))) };
        if details.get::<_, Option<String>>(5).is_none() {
            return Err(StoreError::NotMember(room));
        }
        Ok(())
    }

    /// Refuses a new membership of `user` beyond `max_rooms`, holding the user's row lock until
    /// the transaction ends so the count stays true until the membership is written.
    fn check_room_cap(st: &Statements, tx: &mut Transaction<'_>, user: UserId, max_rooms: u64) -> Result<()> {
        tx.query_opt(&st.lock_user, &[&to_db(user)]).map_err(pg_err)?;
        let count: i64 = tx.query_one(&st.room_count, &[&to_db(user)]).map_err(pg_err)?.get(0);
        crate::check_room_cap(user, from_db(count), max_rooms)
    }

    /// Appends a membership delta with the room's next seq (taking the room's row lock), or
    /// `None` when the room does not exist.
    fn membership_delta(
        st: &Statements,
        tx: &mut Transaction<'_>,
        room: RoomId,
        kind: RecordKind,
        user: UserId,
        user_name: &str,
        now_ms: i64,
    ) -> Result<Option<DeltaRecord>> {
        let Some(row) = tx.query_opt(&st.bump_room, &[&to_db(room)]).map_err(pg_err)? else {
            return Ok(None);
        };
        let part_size: i64 = row.get(1);
        let delta = DeltaRecord {
            room,
            seq: from_db(row.get(0)),
            kind,
            author_id: user,
            author: user_name.into(),
            ts_ms: now_ms,
            body: String::new(),
            target: None,
        };
        tx.execute(
            &st.insert_delta,
            &[&to_db(room), &to_db(delta.seq), &i16::from(kind.0), &to_db(user), &delta.body, &now_ms],
        )
        .map_err(pg_err)?;
        Self::record_partition(st, tx, &delta, part_size)?;
        Ok(Some(delta))
    }
}

impl SharedStore for PgStore {
    fn create_user(&mut self, name: &str, password_hash: &str) -> Result<UserRecord> {
        let row = self.client.query_one(&self.st.create_user, &[&name, &password_hash, &now_ms()]).map_err(pg_err)?;
        Ok(UserRecord { id: from_db(row.get(0)), name: name.into(), password_hash: password_hash.into() })
    }

    fn user_by_name(&mut self, name: &str) -> Result<Option<UserRecord>> {
        let row = self.client.query_opt(&self.st.user_by_name, &[&name]).map_err(pg_err)?;
        Ok(row.as_ref().map(user_row))
    }

    fn create_session(&mut self, session: &NewSession) -> Result<SessionRecord> {
        let row = self
            .client
            .query_one(
                &self.st.create_session,
                &[&to_db(session.user_id), &&session.token_hash[..], &session.ip, &session.user_agent, &session.now_ms],
            )
            .map_err(pg_err)?;
        Ok(crate::created_session(from_db(row.get(0)), session))
    }

    fn session_user(
        &mut self,
        token_hash: &[u8; 32],
        now_ms: i64,
        limits: &SessionLimits,
    ) -> Result<Option<(UserRecord, SessionRecord)>> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let Some(row) = tx.query_opt(&self.st.session_by_token, &[&&token_hash[..]]).map_err(pg_err)? else {
            return Ok(None);
        };
        let session = session_row(&row);
        if !limits.is_live(&session, now_ms) {
            // Committed: an expired session stays dead even if the limits are raised later.
            tx.execute(&self.st.expire_session, &[&to_db(session.id), &now_ms]).map_err(pg_err)?;
            tx.commit().map_err(pg_err)?;
            return Ok(None);
        }
        let touched = tx.query_opt(&self.st.touch_session, &[&to_db(session.id), &now_ms]).map_err(pg_err)?;
        let last_used_at_ms = touched.map_or(session.last_used_at_ms, |row| row.get(0));
        let user = tx.query_opt(&self.st.user_by_id, &[&to_db(session.user_id)]).map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        Ok(user.as_ref().map(|row| (user_row(row), SessionRecord { last_used_at_ms, ..session })))
    }

    fn list_sessions(&mut self, user: UserId, now_ms: i64, limits: &SessionLimits) -> Result<Vec<SessionRecord>> {
        let rows = self.client.query(&self.st.list_sessions, &[&to_db(user)]).map_err(pg_err)?;
        Ok(rows.iter().map(session_row).filter(|s| limits.is_live(s, now_ms)).collect())
    }

    fn revoke_sessions(&mut self, user: UserId, which: Option<SessionId>, now_ms: i64) -> Result<Vec<SessionId>> {
        let rows =
            self.client.query(&self.st.revoke_sessions, &[&to_db(user), &which.map(to_db), &now_ms]).map_err(pg_err)?;
        let mut ids: Vec<SessionId> = rows.iter().map(|row| from_db(row.get(0))).collect();
        // RETURNING gives rows in no promised order.
        ids.sort_unstable();
        Ok(ids)
    }

    fn touch_sessions(&mut self, sessions: &[SessionId], now_ms: i64) -> Result<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = sessions.iter().map(|&s| to_db(s)).collect();
        self.client.execute(&self.st.touch_sessions, &[&ids, &now_ms]).map(drop).map_err(pg_err)
    }

    fn create_room(
        &mut self,
        name: &str,
        kind: RoomKind,
        owner: UserId,
        owner_name: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> Result<(RoomRecord, DeltaRecord)> {
        let part_size = to_db(self.partition_size);
        let mut tx = self.client.transaction().map_err(pg_err)?;
        Self::check_room_cap(&self.st, &mut tx, owner, max_rooms)?;
        let row = tx
            .query_one(&self.st.create_room, &[&name, &i16::from(kind.0), &to_db(owner), &now_ms, &part_size])
            .map_err(pg_err)?;
        let id: i64 = row.get(0);
        tx.execute(&self.st.add_member, &[&id, &to_db(owner), &"owner", &now_ms]).map_err(pg_err)?;
        tx.execute(
            &self.st.insert_delta,
            &[&id, &1_i64, &i16::from(RecordKind::CREATE.0), &to_db(owner), &name, &now_ms],
        )
        .map_err(pg_err)?;
        let created = crate::created_room(from_db(id), name, kind, owner, owner_name, now_ms);
        Self::record_partition(&self.st, &mut tx, &created.1, part_size)?;
        tx.commit().map_err(pg_err)?;
        Ok(created)
    }

    fn open_direct(
        &mut self,
        user: UserId,
        user_name: &str,
        peer: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> Result<DirectRoom> {
        let st = &self.st;
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let peer_id: UserId = match tx.query_opt(&st.user_by_name, &[&peer]).map_err(pg_err)? {
            Some(row) => from_db(row.get(0)),
            None => return Err(StoreError::NotFound(format!("user {peer}"))),
        };
        let (lo, hi) = if user < peer_id { (user, peer_id) } else { (peer_id, user) };
        // Both users' locks in id order: two sides asking at once queue, and the second finds
        // the first's room. The same locks guard the room caps checked below.
        tx.query_opt(&st.lock_user, &[&to_db(lo)]).map_err(pg_err)?;
        tx.query_opt(&st.lock_user, &[&to_db(hi)]).map_err(pg_err)?;
        if let Some(row) = tx.query_opt(&st.direct_room, &[&to_db(lo), &to_db(hi)]).map_err(pg_err)? {
            let room = room_row(&row)?;
            tx.commit().map_err(pg_err)?;
            return Ok(DirectRoom { room, peer: peer_id, created: None });
        }
        for who in [user, peer_id] {
            let count: i64 = tx.query_one(&st.room_count, &[&to_db(who)]).map_err(pg_err)?.get(0);
            crate::check_room_cap(who, from_db(count), max_rooms)?;
        }
        let name = crate::direct_name((user, user_name), (peer_id, peer));
        let kind = i16::from(RoomKind::DIRECT.0);
        let part_size = to_db(self.partition_size);
        let id: i64 =
            tx.query_one(&st.create_room, &[&name, &kind, &to_db(user), &now_ms, &part_size]).map_err(pg_err)?.get(0);
        for who in [user, peer_id] {
            tx.execute(&st.add_member, &[&id, &to_db(who), &"member", &now_ms]).map_err(pg_err)?;
        }
        tx.execute(&st.add_direct, &[&to_db(lo), &to_db(hi), &id]).map_err(pg_err)?;
        tx.execute(&st.insert_delta, &[&id, &1_i64, &i16::from(RecordKind::CREATE.0), &to_db(user), &name, &now_ms])
            .map_err(pg_err)?;
        let (room, delta) = crate::created_room(from_db(id), &name, RoomKind::DIRECT, user, user_name, now_ms);
        Self::record_partition(st, &mut tx, &delta, part_size)?;
        tx.commit().map_err(pg_err)?;
        Ok(DirectRoom { room, peer: peer_id, created: Some(delta) })
    }

    fn room(&mut self, room: RoomId) -> Result<Option<RoomRecord>> {
        let row = self.client.query_opt(&self.st.room, &[&to_db(room)]).map_err(pg_err)?;
        row.as_ref().map(room_row).transpose()
    }

    fn rooms_page(&mut self, user: UserId, after_room: RoomId, limit: u32) -> Result<Vec<RoomRecord>> {
        let rows = self
            .client
            .query(&self.st.rooms_page, &[&to_db(user), &to_db(after_room), &i64::from(limit)])
            .map_err(pg_err)?;
        rows.iter().map(room_row).collect()
    }

    fn rooms_of_user(&mut self, user: UserId) -> Result<Vec<RoomRecord>> {
        let rows = self.client.query(&self.st.rooms_of_user, &[&to_db(user)]).map_err(pg_err)?;
        rows.iter().map(room_row).collect()
    }

    fn is_member(&mut self, room: RoomId, user: UserId) -> Result<bool> {
        let row = self.client.query_opt(&self.st.is_member, &[&to_db(room), &to_db(user)]).map_err(pg_err)?;
        Ok(row.is_some())
    }

    fn room_details(&mut self, room: RoomId, user: UserId) -> Result<Option<RoomDetailsRecord>> {
        let row = self.client.query_opt(&self.st.room_details, &[&to_db(room), &to_db(user)]).map_err(pg_err)?;
        row.map(|row| Ok(RoomDetailsRecord { room: room_row(&row)?, members: from_db(row.get(4)), role: row.get(5) }))
            .transpose()
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

    fn deltas_after(&mut self, room: RoomId, after: Seq, limit: u32) -> Result<Vec<DeltaRecord>> {
        let rows = self
            .client
            .query(&self.st.deltas_after, &[&to_db(room), &to_db(after), &i64::from(limit)])
            .map_err(pg_err)?;
        rows.iter().map(|row| delta_row(room, row)).collect()
    }

    fn deltas_page(&mut self, room: RoomId, order: Order, cursor: Seq, limit: u32) -> Result<Vec<DeltaRecord>> {
        let Some((lo, hi)) = order.range(cursor, limit) else { return Ok(Vec::new()) };
        let statement = match order {
            Order::OldestFirst => &self.st.deltas_page_asc,
            Order::NewestFirst => &self.st.deltas_page_desc,
        };
        let rows = self.client.query(statement, &[&to_db(room), &to_db(lo), &to_db(hi)]).map_err(pg_err)?;
        rows.iter().map(|row| delta_row(room, row)).collect()
    }

    fn partitions(&mut self, room: RoomId) -> Result<Vec<PartitionRecord>> {
        let rows = self.client.query(&self.st.partitions, &[&to_db(room)]).map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|row| PartitionRecord {
                room,
                part: from_db(row.get(0)),
                first_seq: from_db(row.get(1)),
                last_seq: from_db(row.get(2)),
                first_ts_ms: row.get(3),
                last_ts_ms: row.get(4),
                count: from_db(row.get(5)),
            })
            .collect())
    }

    fn search(
        &mut self,
        room: RoomId,
        user: UserId,
        words: &[String],
        before: Seq,
        limit: u32,
    ) -> Result<Vec<MessageRecord>> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        Self::check_member(&self.st, &mut tx, room, user)?;
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let before = if before == Seq::ZERO { i64::MAX } else { to_db(before) };
        // Not a prepared statement: each search is planned for its own words, so the planner can
        // pick the GIN index for rare words and a backward walk of the room's seqs for common
        // ones, which one generic plan for every query could not. The page of matches is a
        // subquery of its own (PostgreSQL plans a LIMIT subquery apart), so the log and the
        // message states are read for those rows only: as one join, the planner walked the
        // room's log alongside, 200,000 deltas for a rare word in a room of a million.
        let rows = tx
            .query(
                &format!(
                    "SELECT {MESSAGE_COLUMNS}
                     FROM (SELECT room_id, seq FROM message_search
                           WHERE room_id = $1 AND seq < $2 AND words @@ $3::text::tsquery
                           ORDER BY seq DESC LIMIT $4) m
                     JOIN deltas d ON d.room_id = m.room_id AND d.seq = m.seq
                     JOIN users u ON u.id = d.author_id
                     LEFT JOIN message_state s ON s.room_id = m.room_id AND s.seq = m.seq
                     ORDER BY m.seq DESC"
                ),
                &[&to_db(room), &before, &search::tsquery(words), &i64::from(limit)],
            )
            .map_err(pg_err)?;
        let mut messages: Vec<MessageRecord> = rows.iter().map(message_row).collect();
        if !messages.is_empty() {
            let seqs: Vec<i64> = messages.iter().map(|m| to_db(m.seq)).collect();
            let counts = tx.query(&self.st.reactions_in, &[&to_db(room), &seqs, &to_db(user)]).map_err(pg_err)?;
            crate::actions::attach_reactions(&mut messages, counts.iter().map(reaction_row).collect());
        }
        tx.commit().map_err(pg_err)?;
        Ok(messages)
    }

    fn messages_before(&mut self, room: RoomId, user: UserId, before: Seq, limit: u32) -> Result<Vec<MessageRecord>> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        Self::check_member(&self.st, &mut tx, room, user)?;
        let before = if before == Seq::ZERO { i64::MAX } else { to_db(before) };
        let rows = tx.query(&self.st.messages_before, &[&to_db(room), &before, &i64::from(limit)]).map_err(pg_err)?;
        let mut messages: Vec<MessageRecord> = rows.iter().map(message_row).collect();
        if let (Some(newest), Some(oldest)) = (messages.first(), messages.last()) {
            let (lo, hi) = (to_db(oldest.seq), to_db(newest.seq));
            let counts = tx
                .query(&self.st.reactions_of, &[&to_db(room), &lo, &hi, &to_db(user)])
                .map_err(pg_err)?
                .iter()
                .map(reaction_row)
                .collect();
            crate::actions::attach_reactions(&mut messages, counts);
        }
        tx.commit().map_err(pg_err)?;
        Ok(messages)
    }

    fn ping(&mut self) -> Result<()> {
        self.client.query_one(&self.st.ping, &[]).map(drop).map_err(pg_err)
    }

    /// PostgreSQL checkpoints on its own schedule, outside any client's commit.
    fn checkpoint(&mut self) -> Result<()> {
        Ok(())
    }
}

impl Store for PgStore {
    fn join_room(
        &mut self,
        room: RoomId,
        user: UserId,
        user_name: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> Result<Option<DeltaRecord>> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        // A room's kind never changes, so it is read before the lock.
        if let Some(row) = tx.query_opt(&self.st.room_kind, &[&to_db(room)]).map_err(pg_err)? {
            let member = tx.query_opt(&self.st.is_member, &[&to_db(room), &to_db(user)]).map_err(pg_err)?.is_some();
            if !member {
                crate::check_not_direct(room, RoomKind(code(row.get(0))?), "join")?;
            }
        }
        // The seq first: it takes the room's lock (the order every room write follows) and tells
        // whether the room exists. Dropping the transaction undoes it when nothing is joined.
        let Some(delta) = Self::membership_delta(&self.st, &mut tx, room, RecordKind::JOIN, user, user_name, now_ms)?
        else {
            return Err(StoreError::NotFound(format!("room {room}")));
        };
        // Under the room's lock nobody else changes this membership, so the answer holds.
        if tx.query_opt(&self.st.is_member, &[&to_db(room), &to_db(user)]).map_err(pg_err)?.is_some() {
            return Ok(None);
        }
        // The user's lock after the room's, like every join; creating a room takes no room lock.
        Self::check_room_cap(&self.st, &mut tx, user, max_rooms)?;
        tx.execute(&self.st.add_member, &[&to_db(room), &to_db(user), &"member", &now_ms]).map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        Ok(Some(delta))
    }

    fn leave_room(&mut self, room: RoomId, user: UserId, user_name: &str, now_ms: i64) -> Result<DeltaRecord> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        if let Some(row) = tx.query_opt(&self.st.room_kind, &[&to_db(room)]).map_err(pg_err)? {
            if tx.query_opt(&self.st.is_member, &[&to_db(room), &to_db(user)]).map_err(pg_err)?.is_some() {
                crate::check_not_direct(room, RoomKind(code(row.get(0))?), "leave")?;
            }
        }
        let delta = Self::membership_delta(&self.st, &mut tx, room, RecordKind::LEAVE, user, user_name, now_ms)?
            .ok_or(StoreError::NotMember(room))?;
        let removed = tx.execute(&self.st.remove_member, &[&to_db(room), &to_db(user)]).map_err(pg_err)?;
        if removed == 0 {
            return Err(StoreError::NotMember(room));
        }
        tx.commit().map_err(pg_err)?;
        Ok(delta)
    }

    fn act(&mut self, a: &NewAction) -> Result<ActionOutcome> {
        let st = &self.st;
        let (room, target, actor) = (to_db(a.room), to_db(a.target), to_db(a.actor));
        let mut tx = self.client.transaction().map_err(pg_err)?;
        // The room's lock first, as every room write takes it.
        let Some(locked) = tx.query_opt(&st.lock_room, &[&room]).map_err(pg_err)? else {
            return Err(StoreError::NotFound(format!("room {}", a.room)));
        };
        let (head, part_size): (i64, i64) = (locked.get(0), locked.get(1));
        let indexed = indexable(locked.get(2))?;
        let Some(role) = tx.query_opt(&st.member_role, &[&room, &actor]).map_err(pg_err)? else {
            return Err(StoreError::NotMember(a.room));
        };
        let role: String = role.get(0);
        if !a.idempotency_key.is_empty() {
            if let Some(row) = tx.query_opt(&st.earlier_key, &[&room, &actor, &a.idempotency_key]).map_err(pg_err)? {
                return Ok(ActionOutcome::Unchanged { seq: from_db(row.get(0)), ts_ms: row.get(1) });
            }
        }
        let emoji = match &a.action {
            MessageAction::React { emoji } | MessageAction::Unreact { emoji } => Some(emoji.as_str()),
            _ => None,
        };
        let found = tx.query_opt(&st.action_target, &[&room, &target, &emoji, &actor]).map_err(pg_err)?;
        let found = match found {
            Some(row) => Some(Target {
                kind: RecordKind(code(row.get(0))?),
                author: from_db(row.get(1)),
                deleted: row.get::<_, Option<i64>>(2).map(from_db),
                pinned: row.get::<_, Option<i64>>(3).map(from_db),
                reaction: row.get::<_, Option<i64>>(4).map(from_db),
            }),
            None => None,
        };
        let perms = Permissions::of_builtin(&role).unwrap_or(Permissions::NONE);
        match actions::judge(a.room, a.target, &a.action, a.actor, perms, found.as_ref())? {
            Verdict::AlreadyDone(seq) => {
                let ts_ms: i64 = tx.query_one(&st.delta_time, &[&room, &to_db(seq)]).map_err(pg_err)?.get(0);
                Ok(ActionOutcome::Unchanged { seq, ts_ms })
            }
            Verdict::Write => {
                let seq = head + 1;
                tx.execute(&st.bump_room, &[&room]).map_err(pg_err)?;
                let key = Some(a.idempotency_key.as_str()).filter(|k| !k.is_empty());
                let kind = i16::from(a.action.kind().0);
                tx.execute(
                    &st.insert_action,
                    &[&room, &seq, &kind, &actor, &a.action.body(), &a.now_ms, &key, &target],
                )
                .map_err(pg_err)?;
                match &a.action {
                    MessageAction::Edit { text } => tx.execute(&st.edit_state, &[&room, &target, text, &a.now_ms]),
                    MessageAction::Delete => tx.execute(&st.delete_state, &[&room, &target, &seq]),
                    MessageAction::Pin => tx.execute(&st.pin_state, &[&room, &target, &seq]),
                    MessageAction::Unpin => tx.execute(&st.unpin_state, &[&room, &target]),
                    MessageAction::React { emoji } => tx
                        .execute(&st.react_user, &[&room, &target, emoji, &actor, &seq])
                        .and_then(|_| tx.execute(&st.react_count, &[&room, &target, emoji])),
                    MessageAction::Unreact { emoji } => tx
                        .execute(&st.unreact_user, &[&room, &target, emoji, &actor])
                        .and_then(|_| tx.execute(&st.unreact_count, &[&room, &target, emoji])),
                    MessageAction::Reply { .. } => Ok(0),
                }
                .map_err(pg_err)?;
                // The search index follows the message's text: a reply is indexed, an edit
                // replaces the words, a delete removes them.
                match &a.action {
                    MessageAction::Reply { text } if indexed => Self::index_message(st, &mut tx, room, seq, text)?,
                    MessageAction::Edit { text } if indexed => Self::index_message(st, &mut tx, room, target, text)?,
                    MessageAction::Delete => {
                        tx.execute(&st.unindex_message, &[&room, &target]).map_err(pg_err)?;
                    }
                    _ => {}
                }
                let delta = DeltaRecord {
                    room: a.room,
                    seq: from_db(seq),
                    kind: a.action.kind(),
                    author_id: a.actor,
                    author: a.actor_name.clone(),
                    ts_ms: a.now_ms,
                    body: a.action.body().to_string(),
                    target: Some(a.target),
                };
                Self::record_partition(st, &mut tx, &delta, part_size)?;
                tx.commit().map_err(pg_err)?;
                Ok(ActionOutcome::Applied(delta))
            }
        }
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
        let locked = tx.query(&self.st.lock_rooms, &[&rooms]).map_err(pg_err)?;
        let mut heads: HashMap<RoomId, u64> = HashMap::with_capacity(locked.len());
        // Per room: its partition size and whether its messages are indexed.
        let mut logs: HashMap<RoomId, (u64, bool)> = HashMap::with_capacity(locked.len());
        for row in &locked {
            let room: RoomId = from_db(row.get(0));
            heads.insert(room, from_db(row.get(1)));
            logs.insert(room, (from_db(row.get(2)), indexable(row.get(3))?));
        }
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
        let mut inserted = Vec::with_capacity(posts.len());
        for (outcome, key) in plan.outcomes.iter().zip(&keys) {
            if let PostOutcome::Inserted(delta) = outcome {
                let indexed = logs.get(&delta.room).is_some_and(|&(_, indexed)| indexed);
                rows.push(delta, *key, indexed);
                inserted.push(delta);
            }
        }
        if !rows.room.is_empty() {
            let part_size = |room| logs.get(&room).map_or(partition::DEFAULT_PARTITION_SIZE, |&(size, _)| size);
            let parts = PartitionColumns::of(&partition::summarize(inserted, part_size));
            tx.execute(
                &self.st.write_posts,
                &[
                    &head_rooms,
                    &head_seqs,
                    &i16::from(RecordKind::MESSAGE.0),
                    &parts.room,
                    &parts.part,
                    &parts.first_seq,
                    &parts.last_seq,
                    &parts.first_ts,
                    &parts.last_ts,
                    &parts.count,
                    &rows.room,
                    &rows.seq,
                    &rows.author,
                    &rows.body,
                    &rows.created_at,
                    &rows.key,
                    &rows.words,
                ],
            )
            .map_err(pg_err)?;
        }
        tx.commit().map_err(pg_err)?;
        Ok(plan.outcomes)
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
    /// The words to index, space-separated; empty for a message not indexed.
    words: Vec<String>,
}

impl<'a> InsertColumns<'a> {
    fn push(&mut self, delta: &'a DeltaRecord, key: Option<&'a str>, indexed: bool) {
        self.room.push(to_db(delta.room));
        self.seq.push(to_db(delta.seq));
        self.author.push(to_db(delta.author_id));
        self.body.push(&delta.body);
        self.created_at.push(delta.ts_ms);
        self.key.push(key);
        self.words.push(if indexed { search::index_text(&delta.body) } else { String::new() });
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_server_that_is_not_running_is_unavailable() {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind").local_addr().expect("addr").port();
        // The listener is gone: connecting to its port is refused.
        let err = PgStore::connect(&format!("postgres://chime@127.0.0.1:{port}/chime")).err().expect("refused");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }

    #[test]
    fn an_unreachable_server_is_unavailable_within_the_connect_timeout() {
        let options = OpenOptions { connect_timeout: Duration::from_millis(300), ..OpenOptions::default() };
        let started = Instant::now();
        // TEST-NET-1 (RFC 5737): nothing answers there, or the network says there is no route.
        let err = PgStore::connect_with("postgres://chime@192.0.2.1:5432/chime", &options).err().expect("no server");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn a_bad_url_is_a_config_error() {
        let err = PgStore::connect("postgres://chime@127.0.0.1:notaport/chime").err().expect("bad port");
        assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    }
}
