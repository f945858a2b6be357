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
use postgres::{Client, Config, IsolationLevel, NoTls, Row, Statement, Transaction};

use crate::actions::{self, Target, Verdict};
use crate::batch::{self, Probe};
use crate::files::{self, FileRecord, NewFile, NewUpload, UploadRecord};
use crate::moderation::{self, MemberAction, MemberState, ModVerdict, ModerationOutcome, NewModeration};
use crate::partition::{self, PartitionRecord};
use crate::search;
use crate::{
    from_db, now_ms, to_db, ActionOutcome, DeltaRecord, DirectRoom, MemberRecord, MentionRecord, MessageAction,
    MessageRecord, NewAction, NewChannel, NewPost, NewServer, NewSession, NotifyLevel, OpenOptions, Order, Permissions,
    PostOutcome, ProfileRecord, ProfileUpdate, RecordKind, Result, RoomDetailsRecord, RoomId, RoomKind, RoomRecord,
    Seq, ServerId, ServerRecord, SessionId, SessionLimits, SessionRecord, SettingWrite, SettingsRecord, SharedStore,
    Store, StoreError, UnreadRecord, UserId, UserRecord,
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
    profile: Statement,
    profile_by_name: Statement,
    update_profile: Statement,
    bump_settings: Statement,
    set_notify: Statement,
    set_account_setting: Statement,
    settings_version: Statement,
    account_settings: Statement,
    notify_settings: Statement,
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
            profile: client.prepare(&format!("SELECT {PROFILE_COLUMNS} FROM users WHERE id = $1"))?,
            profile_by_name: client.prepare(&format!("SELECT {PROFILE_COLUMNS} FROM users WHERE name = $1"))?,
            update_profile: client.prepare(&format!(
                "UPDATE users SET email = CASE WHEN $2 THEN $3::text ELSE email END,
                                  email_key = CASE WHEN $2 THEN $4::text ELSE email_key END,
                                  display_name = COALESCE($5::text, display_name)
                 WHERE id = $1 RETURNING {PROFILE_COLUMNS}"
            ))?,
            // The user's row first, then the membership row: the order of every other
            // transaction that takes both (a join takes the user's after the room's, and no
            // transaction takes a room's after a membership row).
            bump_settings: client.prepare(
                "UPDATE users SET settings_version = settings_version + 1 WHERE id = $1 RETURNING settings_version",
            )?,
            set_notify: client.prepare("UPDATE room_members SET notify = $3 WHERE room_id = $1 AND user_id = $2")?,
            set_account_setting: client.prepare(
                "INSERT INTO user_settings (user_id, key, value) VALUES ($1, $2, $3)
                 ON CONFLICT (user_id, key) DO UPDATE SET value = EXCLUDED.value",
            )?,
            settings_version: client.prepare("SELECT settings_version FROM users WHERE id = $1")?,
            account_settings: client.prepare("SELECT key, value FROM user_settings WHERE user_id = $1 ORDER BY key")?,
            notify_settings: client.prepare(
                "SELECT room_id, notify FROM room_members WHERE user_id = $1 AND notify <> 0 AND room_id > $2
                 ORDER BY room_id LIMIT $3",
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
                 JOIN rooms r ON r.id = m.room_id WHERE m.user_id = $1
                 UNION ALL
                 SELECT r.id, r.name, r.kind, r.last_seq FROM server_members sm
                 JOIN rooms r ON r.server_id = sm.server_id
                 WHERE sm.user_id = $1 AND (r.read_roles IS NULL OR sm.role IN ('owner', 'admin') OR position(',' || sm.role || ',' IN ',' || r.read_roles || ',') > 0)
                 ORDER BY 1",
            )?,
            rooms_page: client.prepare(
                "SELECT r.id, r.name, r.kind, r.last_seq FROM room_members m
                 JOIN rooms r ON r.id = m.room_id WHERE m.user_id = $1 AND m.room_id > $2
                 UNION ALL
                 SELECT r.id, r.name, r.kind, r.last_seq FROM server_members sm
                 JOIN rooms r ON r.server_id = sm.server_id
                 WHERE sm.user_id = $1 AND r.id > $2 AND (r.read_roles IS NULL OR sm.role IN ('owner', 'admin') OR position(',' || sm.role || ',' IN ',' || r.read_roles || ',') > 0)
                 ORDER BY 1 LIMIT $3",
            )?,
            touch_sessions: client.prepare(
                "UPDATE sessions SET last_used_at = GREATEST(last_used_at, $2)
                 WHERE id = ANY($1) AND revoked_at IS NULL",
            )?,
            is_member: client.prepare("SELECT 1 FROM room_access WHERE room_id = $1 AND user_id = $2")?,
            room_details: client.prepare(
                "SELECT r.id, r.name, r.kind, r.last_seq,
                        coalesce((SELECT s.member_count FROM servers s WHERE s.id = r.server_id), r.member_count),
                        (SELECT a.role FROM room_access a WHERE a.room_id = $1 AND a.user_id = $2)
                 FROM rooms r WHERE r.id = $1",
            )?,
            // A channel's members are its server's; other rooms list their own.
            members: client.prepare(
                "SELECT m.user_id, u.name, m.role, m.muted FROM room_members m
                 JOIN users u ON u.id = m.user_id
                 WHERE m.room_id = $1 AND m.user_id > $2
                 UNION ALL
                 SELECT m.user_id, u.name, m.role, FALSE FROM rooms r
                 JOIN server_members m ON m.server_id = r.server_id
                 JOIN users u ON u.id = m.user_id
                 WHERE r.id = $1 AND m.user_id > $2
                 ORDER BY 1 LIMIT $3",
            )?,
            // ORDER BY under FOR UPDATE locks the rows in id order: two batches sharing rooms
            // queue instead of deadlocking.
            lock_rooms: client
                .prepare("SELECT id, last_seq, part_size, kind FROM rooms WHERE id = ANY($1) ORDER BY id FOR UPDATE")?,
            // One row per post, in input order: is the author a member, and the delta an earlier
            // post with the same key wrote, if any (a NULL key matches nothing).
            probe_posts: client.prepare(
                "SELECT m.role, d.seq, d.created_at, m.silenced, m.defined, m.post_roles
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]) WITH ORDINALITY
                      AS p(room_id, author_id, idem, ord)
                 LEFT JOIN LATERAL (
                     SELECT a.role, a.silenced, a.defined, a.post_roles FROM room_access a
                     WHERE a.room_id = p.room_id AND a.user_id = p.author_id LIMIT 1
                 ) m ON TRUE
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
            member_role: client.prepare(
                "SELECT role, silenced, defined, post_roles FROM room_access WHERE room_id = $1 AND user_id = $2",
            )?,
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

/// The columns [`profile_row`] reads, in its order.
const PROFILE_COLUMNS: &str = "id, name, email, display_name";

fn profile_row(row: &Row) -> ProfileRecord {
    ProfileRecord { id: from_db(row.get(0)), name: row.get(1), email: row.get(2), display_name: row.get(3) }
}

/// A stored notification level; a code the schema's CHECK lets through but this build does not
/// know is a database error, not a guess.
fn notify_level(code: i16) -> Result<NotifyLevel> {
    NotifyLevel::from_code(i64::from(code))
        .ok_or_else(|| StoreError::Database(format!("notify level {code} out of range")))
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

const SERVER_COLUMNS: &str = "s.id, s.name, s.description, s.public, s.owner_id, s.member_count, s.member_cap, m.role";

fn server_row(row: &Row) -> ServerRecord {
    ServerRecord {
        id: from_db(row.get(0)),
        name: row.get(1),
        description: row.get(2),
        public: row.get(3),
        owner: from_db(row.get(4)),
        members: from_db(row.get(5)),
        member_cap: from_db(row.get(6)),
        role: row.get(7),
    }
}

/// Server queries: rare next to posts and reads, so prepared where they are used.
mod server_sql {
    pub const ONE: &str =
        "SELECT s.id, s.name, s.description, s.public, s.owner_id, s.member_count, s.member_cap, m.role
         FROM servers s LEFT JOIN server_members m ON m.server_id = s.id AND m.user_id = $2 WHERE s.id = $1";
    pub const PERMS: &str = "SELECT m.role, m.silenced, r.perms FROM server_members m
         LEFT JOIN server_roles r ON r.server_id = m.server_id AND r.name = m.role
         WHERE m.server_id = $1 AND m.user_id = $2";
    pub const COUNT: &str = "SELECT count(*) FROM server_members WHERE user_id = $1";
    pub const CHANNELS: &str = "SELECT r.id, r.name, r.kind, r.last_seq FROM rooms r
         JOIN server_members sm ON sm.server_id = r.server_id AND sm.user_id = $2
         WHERE r.server_id = $1 AND (r.read_roles IS NULL OR sm.role IN ('owner', 'admin') OR position(',' || sm.role || ',' IN ',' || r.read_roles || ',') > 0) ORDER BY r.id";
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

/// A hash read back from a BYTEA column (a wrong length reads as zeros: never written so).
fn sha_of(v: Vec<u8>) -> [u8; 32] {
    <[u8; 32]>::try_from(v.as_slice()).unwrap_or([0; 32])
}

fn file_row(r: &Row) -> FileRecord {
    FileRecord {
        id: from_db(r.get(0)),
        owner: from_db(r.get(1)),
        name: r.get(2),
        internal_name: r.get(3),
        uploaded_ms: r.get(4),
        size: from_db(r.get(5)),
        sha256: sha_of(r.get(6)),
        media_type: r.get(7),
        shared_in: (from_db(r.get(8)), from_db(r.get(9))),
    }
}

/// One more file record points at content `sha` (its row created at one reference).
fn add_content_ref(tx: &mut Transaction<'_>, sha: &[u8; 32], size: u64, now_ms: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO contents (sha256, size, refs, created_at) VALUES ($1, $2, 1, $3)
         ON CONFLICT (sha256) DO UPDATE SET refs = contents.refs + 1",
        &[&&sha[..], &to_db(size), &now_ms],
    )
    .map(drop)
    .map_err(pg_err)
}

/// Inserts a file record and its permission for the room it is shared in; returns it with its id.
fn insert_file(tx: &mut Transaction<'_>, mut f: FileRecord) -> Result<FileRecord> {
    let row = tx
        .query_one(
            "INSERT INTO files (owner_id, name, internal_name, uploaded_at, size, sha256, media_type, room_id, seq)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            &[
                &to_db(f.owner),
                &f.name,
                &f.internal_name,
                &f.uploaded_ms,
                &to_db(f.size),
                &&f.sha256[..],
                &f.media_type,
                &to_db(f.shared_in.0),
                &to_db(f.shared_in.1),
            ],
        )
        .map_err(pg_err)?;
    let id: i64 = row.get(0);
    tx.execute("INSERT INTO file_permissions (file_id, room_id) VALUES ($1, $2)", &[&id, &to_db(f.shared_in.0)])
        .map_err(pg_err)?;
    f.id = from_db(id);
    Ok(f)
}

/// The `FILE_SHARED` delta (room, seq) was deleted: its file record and permissions go, and its
/// content counts one reference less (collected by the daemon at zero).
fn unshare_file(tx: &mut Transaction<'_>, room: i64, seq: i64) -> Result<()> {
    let row = tx
        .query_opt("DELETE FROM files WHERE room_id = $1 AND seq = $2 RETURNING sha256", &[&room, &seq])
        .map_err(pg_err)?;
    if let Some(row) = row {
        let sha: Vec<u8> = row.get(0);
        tx.execute("UPDATE contents SET refs = refs - 1 WHERE sha256 = $1", &[&sha]).map_err(pg_err)?;
    }
    Ok(())
}

impl PgStore {
    /// Records the mentions in a new message (see the SQLite store's twin).
    fn insert_mentions(tx: &mut Transaction<'_>, room: RoomId, seq: Seq, author: UserId, text: &str) -> Result<()> {
        let names = crate::mentioned_names(text);
        if names.is_empty() {
            return Ok(());
        }
        tx.execute(
            "INSERT INTO mentions (user_id, room_id, seq, author_id)
             SELECT u.id, $2, $3, $4 FROM users u
             WHERE u.name = ANY($1) AND u.id <> $4
               AND EXISTS (SELECT 1 FROM room_access a WHERE a.room_id = $2 AND a.user_id = u.id)
             ON CONFLICT DO NOTHING",
            &[&names, &to_db(room), &to_db(seq), &to_db(author)],
        )
        .map_err(pg_err)?;
        Ok(())
    }

    /// A room's unread state for a user, from their cursors.
    fn unread_of(tx: &mut Transaction<'_>, room: RoomId, user: UserId) -> Result<UnreadRecord> {
        let (r, u) = (to_db(room), to_db(user));
        let row = tx
            .query_one(
                "SELECT (SELECT last_seq FROM rooms WHERE id = $1),
                        coalesce(c.delivered_seq, 0), coalesce(c.read_seq, 0)
                 FROM (SELECT 1) AS one
                 LEFT JOIN read_cursors c ON c.room_id = $1 AND c.user_id = $2",
                &[&r, &u],
            )
            .map_err(pg_err)?;
        let head: Option<i64> = row.get(0);
        let (delivered, read): (i64, i64) = (row.get(1), row.get(2));
        let counts = tx
            .query_one(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM deltas WHERE room_id = $1 AND seq > $3 AND kind IN (2, 9, 23)
                         AND author_id <> $2 LIMIT $4) AS x),
                        (SELECT count(*) FROM mentions WHERE user_id = $2 AND room_id = $1 AND seq > $3)",
                &[&r, &u, &read, &(crate::UNREAD_CAP as i64)],
            )
            .map_err(pg_err)?;
        Ok(UnreadRecord {
            room,
            head: from_db(head.unwrap_or(0)),
            delivered: from_db(delivered),
            read: from_db(read),
            unread: from_db(counts.get(0)),
            mentions: from_db(counts.get(1)),
        })
    }

    /// The user's role and permissions in a server, `None` when not a member.
    fn server_perms(tx: &mut Transaction<'_>, server: ServerId, user: UserId) -> Result<Option<(String, Permissions)>> {
        Ok(tx.query_opt(server_sql::PERMS, &[&to_db(server), &to_db(user)]).map_err(pg_err)?.map(|row| {
            let role: String = row.get(0);
            let defined = row.get::<_, Option<i64>>(2).map(|p| Permissions(u32::try_from(p).unwrap_or(0)));
            let perms = moderation::effective(&role, defined, row.get(1));
            (role, perms)
        }))
    }

    /// Whether a user is banned from a server, and whether they hold an invitation to it.
    fn server_standing(tx: &mut Transaction<'_>, server: ServerId, user: UserId) -> Result<(bool, bool)> {
        let row = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM server_bans WHERE server_id = $1 AND user_id = $2),
                        EXISTS (SELECT 1 FROM server_invites WHERE server_id = $1 AND user_id = $2)",
                &[&to_db(server), &to_db(user)],
            )
            .map_err(pg_err)?;
        Ok((row.get(0), row.get(1)))
    }

    fn server_of(tx: &mut Transaction<'_>, server: ServerId, user: UserId) -> Result<Option<ServerRecord>> {
        Ok(tx.query_opt(server_sql::ONE, &[&to_db(server), &to_db(user)]).map_err(pg_err)?.as_ref().map(server_row))
    }

    fn channels(tx: &mut Transaction<'_>, server: ServerId, user: UserId) -> Result<Vec<RoomRecord>> {
        tx.query(server_sql::CHANNELS, &[&to_db(server), &to_db(user)]).map_err(pg_err)?.iter().map(room_row).collect()
    }

    /// Inserts a room of a server with its `CREATE` delta as seq 1.
    fn insert_channel(
        st: &Statements,
        tx: &mut Transaction<'_>,
        c: &NewChannel,
        part_size: i64,
    ) -> Result<(RoomRecord, DeltaRecord)> {
        let row = tx
            .query_one(
                "INSERT INTO rooms (name, kind, last_seq, created_by, created_at, server_id, read_roles, post_roles,
                                    part_size)
                 VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8) RETURNING id",
                &[
                    &c.name,
                    &i16::from(c.kind.0),
                    &to_db(c.actor),
                    &c.now_ms,
                    &to_db(c.server),
                    &crate::role_list(&c.read_roles),
                    &crate::role_list(&c.post_roles),
                    &part_size,
                ],
            )
            .map_err(pg_err)?;
        let id: i64 = row.get(0);
        tx.execute(
            &st.insert_delta,
            &[&id, &1_i64, &i16::from(RecordKind::CREATE.0), &to_db(c.actor), &c.name, &c.now_ms],
        )
        .map_err(pg_err)?;
        let created = crate::created_room(from_db(id), &c.name, c.kind, c.actor, &c.actor_name, c.now_ms);
        Self::record_partition(st, tx, &created.1, part_size)?;
        Ok(created)
    }

    /// The member's role and permissions in the room, `None` when not a member.
    fn member_perms(
        st: &Statements,
        tx: &mut Transaction<'_>,
        room: RoomId,
        user: UserId,
    ) -> Result<Option<(String, Permissions)>> {
        Ok(tx.query_opt(&st.member_role, &[&to_db(room), &to_db(user)]).map_err(pg_err)?.map(|row| {
            let role: String = row.get(0);
            let defined = row.get::<_, Option<i64>>(2).map(|p| Permissions(u32::try_from(p).unwrap_or(0)));
            let perms = moderation::effective(&role, defined, row.get(1));
            let post_roles: Option<String> = row.get(3);
            let perms = crate::channel_perms(&role, perms, post_roles.as_deref());
            (role, perms)
        }))
    }

    /// Appends `delta` to its room's log, at the seq after the head the caller read under the
    /// room's row lock: bumps the head, inserts the row (with its idempotency key and target) and
    /// its partition bookkeeping. What SQLite's `append_delta` is to that store.
    fn append_action(
        st: &Statements,
        tx: &mut Transaction<'_>,
        delta: &DeltaRecord,
        key: Option<&str>,
        part_size: i64,
    ) -> Result<()> {
        let room = to_db(delta.room);
        tx.execute(&st.bump_room, &[&room]).map_err(pg_err)?;
        let target = delta.target.map(to_db);
        tx.execute(
            &st.insert_action,
            &[
                &room,
                &to_db(delta.seq),
                &i16::from(delta.kind.0),
                &to_db(delta.author_id),
                &delta.body,
                &delta.ts_ms,
                &key,
                &target,
            ],
        )
        .map_err(pg_err)?;
        Self::record_partition(st, tx, delta, part_size)
    }

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

    fn profile(&mut self, user: UserId) -> Result<Option<ProfileRecord>> {
        let row = self.client.query_opt(&self.st.profile, &[&to_db(user)]).map_err(pg_err)?;
        Ok(row.as_ref().map(profile_row))
    }

    fn profile_by_name(&mut self, name: &str) -> Result<Option<ProfileRecord>> {
        let row = self.client.query_opt(&self.st.profile_by_name, &[&name]).map_err(pg_err)?;
        Ok(row.as_ref().map(profile_row))
    }

    fn update_profile(&mut self, user: UserId, update: &ProfileUpdate) -> Result<ProfileRecord> {
        let email = update.email.as_ref().map(Option::as_deref);
        let key = email.flatten().map(crate::email_key);
        let row = self
            .client
            .query_opt(
                &self.st.update_profile,
                &[&to_db(user), &email.is_some(), &email.flatten(), &key, &update.display_name],
            )
            .map_err(|e| crate::email_taken(pg_err(e), update))?;
        row.as_ref().map(profile_row).ok_or_else(|| StoreError::NotFound(format!("user {user}")))
    }

    fn set_setting(&mut self, user: UserId, setting: &SettingWrite<'_>) -> Result<u64> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let version: i64 = tx
            .query_opt(&self.st.bump_settings, &[&to_db(user)])
            .map_err(pg_err)?
            .ok_or_else(|| StoreError::NotFound(format!("user {user}")))?
            .get(0);
        match *setting {
            SettingWrite::Notify { room, level } => {
                let updated =
                    tx.execute(&self.st.set_notify, &[&to_db(room), &to_db(user), &level.code()]).map_err(pg_err)?;
                // Returning drops the transaction, rolling the version bump back.
                if updated == 0 {
                    return Err(StoreError::NotMember(room));
                }
            }
            SettingWrite::Account { key, value } => {
                tx.execute(&self.st.set_account_setting, &[&to_db(user), &key, &value]).map_err(pg_err)?;
            }
        }
        tx.commit().map_err(pg_err)?;
        Ok(from_db(version))
    }

    fn settings(&mut self, user: UserId, after_room: RoomId, limit: u32) -> Result<SettingsRecord> {
        // One snapshot for the version and the rows, so a change committed between the reads
        // cannot show in one and not the other.
        let mut tx = self
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(pg_err)?;
        let version: i64 = tx
            .query_opt(&self.st.settings_version, &[&to_db(user)])
            .map_err(pg_err)?
            .ok_or_else(|| StoreError::NotFound(format!("user {user}")))?
            .get(0);
        let account = tx
            .query(&self.st.account_settings, &[&to_db(user)])
            .map_err(pg_err)?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let notify = tx
            .query(&self.st.notify_settings, &[&to_db(user), &to_db(after_room), &i64::from(limit)])
            .map_err(pg_err)?
            .iter()
            .map(|row| Ok((from_db(row.get(0)), notify_level(row.get(1))?)))
            .collect::<Result<_>>()?;
        tx.commit().map_err(pg_err)?;
        Ok(SettingsRecord { version: from_db(version), account, notify })
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

    fn create_server(&mut self, s: &NewServer, max_servers: u64) -> Result<(ServerRecord, RoomRecord, DeltaRecord)> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        // The owner's lock guards the server cap, as it guards the room cap.
        tx.query_opt(&self.st.lock_user, &[&to_db(s.owner)]).map_err(pg_err)?;
        let count: i64 = tx.query_one(server_sql::COUNT, &[&to_db(s.owner)]).map_err(pg_err)?.get(0);
        crate::check_server_cap(s.owner, from_db(count), max_servers)?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO servers (name, description, public, owner_id, member_cap, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[&s.name, &s.description, &s.public, &to_db(s.owner), &to_db(s.member_cap), &s.now_ms],
            )
            .map_err(pg_err)?
            .get(0);
        tx.execute(
            "INSERT INTO server_members (server_id, user_id, role, joined_at) VALUES ($1, $2, 'owner', $3)",
            &[&id, &to_db(s.owner), &s.now_ms],
        )
        .map_err(pg_err)?;
        let server: ServerId = from_db(id);
        let general = NewChannel {
            server,
            actor: s.owner,
            actor_name: s.owner_name.clone(),
            name: "general".into(),
            kind: RoomKind::CHANNEL,
            read_roles: Vec::new(),
            post_roles: Vec::new(),
            now_ms: s.now_ms,
        };
        let (room, delta) = Self::insert_channel(&self.st, &mut tx, &general, to_db(self.partition_size))?;
        let record = Self::server_of(&mut tx, server, s.owner)?
            .ok_or_else(|| StoreError::NotFound(format!("server {server}")))?;
        tx.commit().map_err(pg_err)?;
        Ok((record, room, delta))
    }

    fn join_server(
        &mut self,
        server: ServerId,
        user: UserId,
        now_ms: i64,
        max_servers: u64,
    ) -> Result<(ServerRecord, Vec<RoomRecord>, bool)> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        // The server's row lock orders joins against the cap (the member count lives in it).
        let locked =
            tx.query_opt("SELECT 1 FROM servers WHERE id = $1 FOR UPDATE", &[&to_db(server)]).map_err(pg_err)?;
        if locked.is_none() {
            return Err(StoreError::NotFound(format!("server {server}")));
        }
        let record =
            Self::server_of(&mut tx, server, user)?.ok_or_else(|| StoreError::NotFound(format!("server {server}")))?;
        if record.role.is_some() {
            let channels = Self::channels(&mut tx, server, user)?;
            tx.commit().map_err(pg_err)?;
            return Ok((record, channels, false));
        }
        let (banned, invited) = Self::server_standing(&mut tx, server, user)?;
        if banned {
            return Err(StoreError::Forbidden(format!("you are banned from server {server}")));
        }
        if !record.public && !invited {
            return Err(StoreError::Forbidden(format!("server {server} is private: join by invitation")));
        }
        if record.members >= record.member_cap {
            return Err(StoreError::LimitReached(format!("server {server} has {} members, its cap", record.members)));
        }
        tx.execute("DELETE FROM server_invites WHERE server_id = $1 AND user_id = $2", &[&to_db(server), &to_db(user)])
            .map_err(pg_err)?;
        tx.query_opt(&self.st.lock_user, &[&to_db(user)]).map_err(pg_err)?;
        let count: i64 = tx.query_one(server_sql::COUNT, &[&to_db(user)]).map_err(pg_err)?.get(0);
        crate::check_server_cap(user, from_db(count), max_servers)?;
        tx.execute(
            "INSERT INTO server_members (server_id, user_id, role, joined_at) VALUES ($1, $2, 'member', $3)",
            &[&to_db(server), &to_db(user), &now_ms],
        )
        .map_err(pg_err)?;
        let record =
            Self::server_of(&mut tx, server, user)?.ok_or_else(|| StoreError::NotFound(format!("server {server}")))?;
        let channels = Self::channels(&mut tx, server, user)?;
        tx.commit().map_err(pg_err)?;
        Ok((record, channels, true))
    }

    fn leave_server(&mut self, server: ServerId, user: UserId) -> Result<Vec<RoomId>> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let record =
            Self::server_of(&mut tx, server, user)?.ok_or_else(|| StoreError::NotFound(format!("server {server}")))?;
        match record.role.as_deref() {
            None => return Err(StoreError::NotFound(format!("you are not a member of server {server}"))),
            Some("owner") => return Err(StoreError::Forbidden(format!("the owner cannot leave server {server}"))),
            Some(_) => {}
        }
        let channels = Self::channels(&mut tx, server, user)?.into_iter().map(|r| r.id).collect();
        tx.execute("DELETE FROM server_members WHERE server_id = $1 AND user_id = $2", &[&to_db(server), &to_db(user)])
            .map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        Ok(channels)
    }

    fn servers_page(&mut self, user: UserId, after: ServerId, limit: u32) -> Result<Vec<ServerRecord>> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {SERVER_COLUMNS} FROM server_members m JOIN servers s ON s.id = m.server_id
                     WHERE m.user_id = $1 AND m.server_id > $2 ORDER BY m.server_id LIMIT $3"
                ),
                &[&to_db(user), &to_db(after), &i64::from(limit)],
            )
            .map_err(pg_err)?;
        Ok(rows.iter().map(server_row).collect())
    }

    fn create_channel(&mut self, c: &NewChannel) -> Result<(RoomRecord, DeltaRecord)> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        if Self::server_of(&mut tx, c.server, c.actor)?.is_none() {
            return Err(StoreError::NotFound(format!("server {}", c.server)));
        }
        let (_, perms) = Self::server_perms(&mut tx, c.server, c.actor)?
            .ok_or_else(|| StoreError::NotFound(format!("you are not a member of server {}", c.server)))?;
        if !perms.contains(Permissions::MANAGE_CHANNELS) {
            return Err(StoreError::Forbidden(format!(
                "your role in server {} does not allow manage_channels",
                c.server
            )));
        }
        let made = Self::insert_channel(&self.st, &mut tx, c, to_db(self.partition_size))?;
        tx.commit().map_err(pg_err)?;
        Ok(made)
    }

    fn set_server_role(&mut self, server: ServerId, actor: UserId, target: &str, role: &str) -> Result<bool> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let (actor_role, perms) = Self::server_perms(&mut tx, server, actor)?
            .ok_or_else(|| StoreError::NotFound(format!("you are not a member of server {server}")))?;
        let target_id: UserId = match tx.query_opt(&self.st.user_by_name, &[&target]).map_err(pg_err)? {
            Some(row) => from_db(row.get(0)),
            None => return Err(StoreError::NotFound(format!("user {target}"))),
        };
        let current = Self::server_perms(&mut tx, server, target_id)?.map(|(r, _)| r);
        let state = MemberState { role: current, muted: false, banned: false };
        let known = Permissions::of_builtin(role).is_some()
            || tx
                .query_opt("SELECT 1 FROM server_roles WHERE server_id = $1 AND name = $2", &[&to_db(server), &role])
                .map_err(pg_err)?
                .is_some();
        let action = MemberAction::SetRole(role.to_string());
        match moderation::judge(RoomId(0), &action, (actor, &actor_role, perms), (target_id, target, &state), known)? {
            ModVerdict::Unchanged => Ok(false),
            ModVerdict::Write => {
                tx.execute(
                    "UPDATE server_members SET role = $3 WHERE server_id = $1 AND user_id = $2",
                    &[&to_db(server), &to_db(target_id), &role],
                )
                .map_err(pg_err)?;
                tx.commit().map_err(pg_err)?;
                Ok(true)
            }
        }
    }

    fn define_server_role(
        &mut self,
        server: ServerId,
        actor: UserId,
        name: &str,
        perms: Option<Permissions>,
    ) -> Result<()> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let (_, mine) = Self::server_perms(&mut tx, server, actor)?
            .ok_or_else(|| StoreError::NotFound(format!("you are not a member of server {server}")))?;
        moderation::check_define(RoomId(0), name, mine)?;
        match perms {
            Some(p) => tx.execute(
                "INSERT INTO server_roles (server_id, name, perms) VALUES ($1, $2, $3)
                 ON CONFLICT (server_id, name) DO UPDATE SET perms = excluded.perms",
                &[&to_db(server), &name, &i64::from(p.0)],
            ),
            None => tx.execute("DELETE FROM server_roles WHERE server_id = $1 AND name = $2", &[&to_db(server), &name]),
        }
        .map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        Ok(())
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

    fn mark_read(&mut self, room: RoomId, user: UserId, delivered: Seq, read: Seq) -> Result<UnreadRecord> {
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let head: i64 = match tx.query_opt(&self.st.room_kind, &[&to_db(room)]).map_err(pg_err)? {
            None => return Err(StoreError::NotFound(format!("room {room}"))),
            Some(_) => {
                tx.query_one("SELECT last_seq FROM rooms WHERE id = $1", &[&to_db(room)]).map_err(pg_err)?.get(0)
            }
        };
        if tx.query_opt(&self.st.is_member, &[&to_db(room), &to_db(user)]).map_err(pg_err)?.is_none() {
            return Err(StoreError::NotMember(room));
        }
        let read = to_db(read).min(head);
        let delivered = to_db(delivered).max(read).min(head);
        tx.execute(
            "INSERT INTO read_cursors (room_id, user_id, delivered_seq, read_seq) VALUES ($1, $2, $3, $4)
             ON CONFLICT (room_id, user_id) DO UPDATE SET
                 delivered_seq = GREATEST(read_cursors.delivered_seq, excluded.delivered_seq),
                 read_seq = GREATEST(read_cursors.read_seq, excluded.read_seq)",
            &[&to_db(room), &to_db(user), &delivered, &read],
        )
        .map_err(pg_err)?;
        let state = Self::unread_of(&mut tx, room, user)?;
        tx.commit().map_err(pg_err)?;
        Ok(state)
    }

    fn unread(&mut self, user: UserId, after: RoomId, limit: u32) -> Result<Vec<UnreadRecord>> {
        // One statement for every room of the user (a query per room cost a user in 100
        // servers 200 round trips, ~40 ms, at each login). A room whose head is not past the
        // read cursor has nothing unread and no mention after it, so only the others are counted.
        let rows = self
            .client
            .query(
                "WITH mine AS (
                     SELECT r.id, r.last_seq FROM room_members m
                     JOIN rooms r ON r.id = m.room_id WHERE m.user_id = $1 AND m.room_id > $2
                     UNION ALL
                     SELECT r.id, r.last_seq FROM server_members sm
                     JOIN rooms r ON r.server_id = sm.server_id
                     WHERE sm.user_id = $1 AND r.id > $2 AND (r.read_roles IS NULL OR sm.role IN ('owner', 'admin')
                         OR position(',' || sm.role || ',' IN ',' || r.read_roles || ',') > 0)
                 ),
                 state AS (
                     SELECT mine.id, mine.last_seq, coalesce(c.delivered_seq, 0) AS delivered,
                            coalesce(c.read_seq, 0) AS read
                     FROM mine LEFT JOIN read_cursors c ON c.room_id = mine.id AND c.user_id = $1
                     WHERE mine.last_seq > coalesce(c.read_seq, 0)
                 )
                 SELECT s.id, s.last_seq, s.delivered, s.read, u.n, mn.n
                 FROM state s
                 CROSS JOIN LATERAL (SELECT count(*) AS n FROM (SELECT 1 FROM deltas d
                     WHERE d.room_id = s.id AND d.seq > s.read AND d.kind IN (2, 9, 23) AND d.author_id <> $1
                     LIMIT $3) AS x) AS u
                 CROSS JOIN LATERAL (SELECT count(*) AS n FROM mentions m
                     WHERE m.user_id = $1 AND m.room_id = s.id AND m.seq > s.read) AS mn
                 WHERE u.n > 0 OR mn.n > 0
                 ORDER BY s.id LIMIT $4",
                &[&to_db(user), &to_db(after), &(crate::UNREAD_CAP as i64), &i64::from(limit)],
            )
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| UnreadRecord {
                room: from_db(r.get::<_, i64>(0)),
                head: from_db(r.get::<_, i64>(1)),
                delivered: from_db(r.get::<_, i64>(2)),
                read: from_db(r.get::<_, i64>(3)),
                unread: from_db(r.get::<_, i64>(4)),
                mentions: from_db(r.get::<_, i64>(5)),
            })
            .collect())
    }

    fn mentions(&mut self, user: UserId, limit: u32) -> Result<Vec<MentionRecord>> {
        let rows = self
            .client
            .query(
                "SELECT m.room_id, m.seq, u.name, d.created_at, coalesce(s.text, d.body), s.deleted_seq,
                        coalesce(rc.read_seq, 0) >= m.seq
                 FROM mentions m
                 JOIN deltas d ON d.room_id = m.room_id AND d.seq = m.seq
                 JOIN users u ON u.id = m.author_id
                 LEFT JOIN message_state s ON s.room_id = m.room_id AND s.seq = m.seq
                 LEFT JOIN read_cursors rc ON rc.room_id = m.room_id AND rc.user_id = m.user_id
                 WHERE m.user_id = $1
                   AND EXISTS (SELECT 1 FROM room_access a WHERE a.room_id = m.room_id AND a.user_id = $1)
                 ORDER BY d.created_at DESC, m.seq DESC LIMIT $2",
                &[&to_db(user), &i64::from(limit)],
            )
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| {
                let deleted = r.get::<_, Option<i64>>(5).is_some();
                MentionRecord {
                    room: from_db(r.get(0)),
                    seq: from_db(r.get(1)),
                    author: r.get(2),
                    ts_ms: r.get(3),
                    text: if deleted { None } else { Some(r.get(4)) },
                    read: r.get(6),
                }
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

    fn moderate_server(
        &mut self,
        server: ServerId,
        actor: UserId,
        target: &str,
        action: &MemberAction,
        now_ms: i64,
    ) -> Result<crate::ServerModerated> {
        crate::check_server_action(action)?;
        let mut tx = self.client.transaction().map_err(pg_err)?;
        // The server's row lock orders this against joins (a ban racing the user's join).
        tx.query_opt("SELECT 1 FROM servers WHERE id = $1 FOR UPDATE", &[&to_db(server)]).map_err(pg_err)?;
        let (actor_role, perms) = Self::server_perms(&mut tx, server, actor)?
            .ok_or_else(|| StoreError::NotFound(format!("you are not a member of server {server}")))?;
        let user: UserId = tx
            .query_opt("SELECT id FROM users WHERE name = $1", &[&target])
            .map_err(pg_err)?
            .map(|row| from_db(row.get::<_, i64>(0)))
            .ok_or_else(|| StoreError::NotFound(format!("user {target}")))?;
        let role = Self::server_perms(&mut tx, server, user)?.map(|(r, _)| r);
        let (banned, _) = Self::server_standing(&mut tx, server, user)?;
        let state = MemberState { role: role.clone(), muted: false, banned };
        let room = RoomId(server.get());
        let mut done = crate::ServerModerated { user, changed: false, left_channels: Vec::new() };
        if moderation::judge(room, action, (actor, &actor_role, perms), (user, target, &state), true)?
            == ModVerdict::Unchanged
        {
            tx.commit().map_err(pg_err)?;
            return Ok(done);
        }
        let (s, u) = (to_db(server), to_db(user));
        match action {
            MemberAction::Invite => tx.execute(
                "INSERT INTO server_invites (server_id, user_id, invited_by, invited_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&s, &u, &to_db(actor), &now_ms],
            ),
            MemberAction::Ban => {
                if role.is_some() {
                    done.left_channels = Self::channels(&mut tx, server, user)?.into_iter().map(|r| r.id).collect();
                }
                tx.execute("DELETE FROM server_members WHERE server_id = $1 AND user_id = $2", &[&s, &u])
                    .and_then(|_| tx.execute("DELETE FROM server_invites WHERE server_id = $1 AND user_id = $2", &[&s, &u]))
                    .and_then(|_| {
                        tx.execute(
                            "INSERT INTO server_bans (server_id, user_id, banned_by, banned_at) VALUES ($1, $2, $3, $4)",
                            &[&s, &u, &to_db(actor), &now_ms],
                        )
                    })
            }
            _ => tx.execute("DELETE FROM server_bans WHERE server_id = $1 AND user_id = $2", &[&s, &u]),
        }
        .map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        done.changed = true;
        Ok(done)
    }

    fn last_seen(&mut self, users: &[UserId]) -> Result<Vec<(UserId, i64)>> {
        let ids: Vec<i64> = users.iter().map(|&u| to_db(u)).collect();
        let rows = self
            .client
            .query(
                "SELECT user_id, max(last_used_at) FROM sessions WHERE user_id = ANY($1)
                 GROUP BY user_id ORDER BY user_id",
                &[&ids],
            )
            .map_err(pg_err)?;
        Ok(rows.iter().map(|r| (from_db(r.get::<_, i64>(0)), r.get::<_, i64>(1))).collect())
    }

    fn push_targets(&mut self, room: RoomId, seq: Seq, author: UserId) -> Result<Vec<crate::PushTarget>> {
        let rows = self
            .client
            .query(
                "SELECT m.user_id, u.name, 0::bigint FROM mentions m
                 JOIN users u ON u.id = m.user_id
                 LEFT JOIN room_members rm ON rm.room_id = m.room_id AND rm.user_id = m.user_id
                 WHERE m.room_id = $1 AND m.seq = $2 AND m.user_id <> $3
                   AND coalesce(rm.notify, 0) <> 2 AND NOT coalesce(rm.muted, FALSE)
                 UNION ALL
                 SELECT rm.user_id, u.name, 1::bigint FROM rooms r
                 JOIN room_members rm ON rm.room_id = r.id
                 JOIN users u ON u.id = rm.user_id
                 WHERE r.id = $1 AND r.kind = $4 AND rm.user_id <> $3 AND rm.notify <> 2 AND NOT rm.muted",
                &[&to_db(room), &to_db(seq), &to_db(author), &i16::from(RoomKind::DIRECT.0)],
            )
            .map_err(pg_err)?;
        Ok(crate::push_targets_from(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2)))))
    }

    fn create_upload(&mut self, u: &NewUpload) -> Result<UploadRecord> {
        let st = &self.st;
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let Some((_, perms)) = Self::member_perms(st, &mut tx, u.room, u.user)? else {
            let exists = tx.query_opt("SELECT 1 FROM rooms WHERE id = $1", &[&to_db(u.room)]).map_err(pg_err)?;
            return Err(match exists {
                Some(_) => StoreError::NotMember(u.room),
                None => StoreError::NotFound(format!("room {}", u.room)),
            });
        };
        if !perms.contains(Permissions::POST) {
            return Err(StoreError::Forbidden(format!("you may not post in room {}", u.room)));
        }
        // Counted under a lock on the user's row, so two BEGINs at once cannot both pass the cap.
        tx.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&to_db(u.user)]).map_err(pg_err)?;
        let open: i64 =
            tx.query_one("SELECT count(*) FROM uploads WHERE user_id = $1", &[&to_db(u.user)]).map_err(pg_err)?.get(0);
        if open >= to_db(files::MAX_OPEN_UPLOADS) {
            return Err(StoreError::LimitReached(format!(
                "{open} unfinished uploads; finish one first (at most {})",
                files::MAX_OPEN_UPLOADS
            )));
        }
        let row = tx
            .query_one(
                "INSERT INTO uploads (user_id, room_id, name, size, media_type, sha256, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                &[&to_db(u.user), &to_db(u.room), &u.name, &to_db(u.size), &u.media_type, &&u.sha256[..], &u.now_ms],
            )
            .map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        Ok(UploadRecord {
            id: from_db(row.get(0)),
            user: u.user,
            room: u.room,
            name: u.name.clone(),
            size: u.size,
            media_type: u.media_type.clone(),
            sha256: u.sha256,
        })
    }

    fn upload(&mut self, id: u64, user: UserId) -> Result<UploadRecord> {
        let row = self
            .client
            .query_opt(
                "SELECT id, user_id, room_id, name, size, media_type, sha256 FROM uploads WHERE id = $1 AND user_id = $2",
                &[&to_db(id), &to_db(user)],
            )
            .map_err(pg_err)?
            .ok_or_else(|| StoreError::NotFound(format!("upload {id}")))?;
        Ok(UploadRecord {
            id: from_db(row.get(0)),
            user: from_db(row.get(1)),
            room: from_db(row.get(2)),
            name: row.get(3),
            size: from_db(row.get(4)),
            media_type: row.get(5),
            sha256: sha_of(row.get(6)),
        })
    }

    fn file_for(&mut self, file: u64, user: UserId) -> Result<FileRecord> {
        let row = self
            .client
            .query_opt(
                "SELECT f.id, f.owner_id, f.name, f.internal_name, f.uploaded_at, f.size, f.sha256, f.media_type,
                        f.room_id, f.seq
                 FROM files f
                 WHERE f.id = $1 AND EXISTS (
                     SELECT 1 FROM file_permissions p JOIN room_access a ON a.room_id = p.room_id
                     WHERE p.file_id = f.id AND a.user_id = $2)",
                &[&to_db(file), &to_db(user)],
            )
            .map_err(pg_err)?
            .ok_or_else(|| StoreError::NotFound(format!("file {file}")))?;
        Ok(file_row(&row))
    }

    fn drop_content(&mut self, sha256: &[u8; 32]) -> Result<bool> {
        let n = self
            .client
            .execute("DELETE FROM contents WHERE sha256 = $1 AND refs <= 0", &[&&sha256[..]])
            .map_err(pg_err)?;
        Ok(n > 0)
    }

    fn unreferenced_contents(&mut self, limit: u32) -> Result<Vec<[u8; 32]>> {
        let rows = self
            .client
            .query("SELECT sha256 FROM contents WHERE refs <= 0 LIMIT $1", &[&i64::from(limit)])
            .map_err(pg_err)?;
        Ok(rows.iter().map(|r| sha_of(r.get(0))).collect())
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
                let kind = RoomKind(code(row.get(0))?);
                crate::check_not_direct(room, kind, "join")?;
                crate::check_not_channel(room, kind, "join")?;
                if kind == RoomKind::PRIVATE || kind == RoomKind::SECRET {
                    return Err(StoreError::Forbidden(format!("room {room} is invite-only")));
                }
                let banned = tx
                    .query_opt(
                        "SELECT 1 FROM room_bans WHERE room_id = $1 AND user_id = $2",
                        &[&to_db(room), &to_db(user)],
                    )
                    .map_err(pg_err)?;
                if banned.is_some() {
                    return Err(StoreError::Forbidden(format!("you are banned from room {room}")));
                }
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
                crate::check_not_channel(room, RoomKind(code(row.get(0))?), "leave")?;
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

    // Moderation is rare: its statements are prepared when used rather than for every connection.
    fn moderate(&mut self, m: &NewModeration) -> Result<ModerationOutcome> {
        let st = &self.st;
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let room = to_db(m.room);
        // The room's lock first, as every room write takes it.
        let Some(head) = tx.query_opt(&st.lock_room, &[&room]).map_err(pg_err)? else {
            return Err(StoreError::NotFound(format!("room {}", m.room)));
        };
        let (head, part_size): (i64, i64) = (head.get(0), head.get(1));
        let kind = RoomKind(code(tx.query_one(&st.room_kind, &[&room]).map_err(pg_err)?.get(0))?);
        let (actor_role, perms) =
            Self::member_perms(st, &mut tx, m.room, m.actor)?.ok_or(StoreError::NotMember(m.room))?;
        crate::check_not_direct(m.room, kind, "moderate")?;
        crate::check_not_channel(m.room, kind, "moderate")?;
        let target: UserId = match tx.query_opt(&st.user_by_name, &[&m.target]).map_err(pg_err)? {
            Some(row) => from_db(row.get(0)),
            None => return Err(StoreError::NotFound(format!("user {}", m.target))),
        };
        let user = to_db(target);
        let row = tx
            .query_opt("SELECT role, silenced FROM room_members WHERE room_id = $1 AND user_id = $2", &[&room, &user])
            .map_err(pg_err)?;
        let (role, muted) = row.map_or((None, false), |r| (Some(r.get::<_, String>(0)), r.get(1)));
        let banned = tx
            .query_opt("SELECT 1 FROM room_bans WHERE room_id = $1 AND user_id = $2", &[&room, &user])
            .map_err(pg_err)?
            .is_some();
        let state = MemberState { role, muted, banned };
        let role_known = match &m.action {
            MemberAction::SetRole(name) => {
                Permissions::of_builtin(name).is_some()
                    || tx
                        .query_opt("SELECT 1 FROM room_roles WHERE room_id = $1 AND name = $2", &[&room, name])
                        .map_err(pg_err)?
                        .is_some()
            }
            _ => true,
        };
        let verdict = moderation::judge(
            m.room,
            &m.action,
            (m.actor, &actor_role, perms),
            (target, &m.target, &state),
            role_known,
        )?;
        if verdict == ModVerdict::Unchanged {
            return Ok(ModerationOutcome::Unchanged { head: from_db(head) });
        }
        let (mut added, mut removed) = (false, false);
        let remove = "DELETE FROM room_members WHERE room_id = $1 AND user_id = $2";
        match &m.action {
            MemberAction::Invite => {
                Self::check_room_cap(st, &mut tx, target, m.max_rooms)?;
                tx.execute(&st.add_member, &[&room, &user, &"member", &m.now_ms]).map_err(pg_err)?;
                added = true;
            }
            MemberAction::Kick => {
                tx.execute(remove, &[&room, &user]).map_err(pg_err)?;
                removed = true;
            }
            MemberAction::Ban => {
                tx.execute(
                    "INSERT INTO room_bans (room_id, user_id, banned_by, banned_at) VALUES ($1, $2, $3, $4)",
                    &[&room, &user, &to_db(m.actor), &m.now_ms],
                )
                .map_err(pg_err)?;
                removed = tx.execute(remove, &[&room, &user]).map_err(pg_err)? > 0;
            }
            MemberAction::Unban => {
                tx.execute("DELETE FROM room_bans WHERE room_id = $1 AND user_id = $2", &[&room, &user])
                    .map_err(pg_err)?;
            }
            MemberAction::Mute | MemberAction::Unmute => {
                let on = m.action == MemberAction::Mute;
                tx.execute(
                    "UPDATE room_members SET silenced = $3 WHERE room_id = $1 AND user_id = $2",
                    &[&room, &user, &on],
                )
                .map_err(pg_err)?;
            }
            MemberAction::SetRole(new) => {
                tx.execute(
                    "UPDATE room_members SET role = $3 WHERE room_id = $1 AND user_id = $2",
                    &[&room, &user, new],
                )
                .map_err(pg_err)?;
            }
        }
        let body = match &m.action {
            MemberAction::SetRole(new) => new.clone(),
            _ => m.target.clone(),
        };
        let delta = DeltaRecord {
            room: m.room,
            seq: from_db(head + 1),
            kind: m.action.kind(),
            author_id: m.actor,
            author: m.actor_name.clone(),
            ts_ms: m.now_ms,
            body,
            target: Some(Seq(target.get())),
        };
        Self::append_action(st, &mut tx, &delta, None, part_size)?;
        tx.commit().map_err(pg_err)?;
        Ok(ModerationOutcome::Applied { delta, user: target, added, removed })
    }

    fn signal(
        &mut self,
        room: RoomId,
        actor: (UserId, &str),
        kind: RecordKind,
        call: Seq,
        data: &str,
        now_ms: i64,
    ) -> Result<DeltaRecord> {
        let st = &self.st;
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let id = to_db(room);
        let Some(head) = tx.query_opt(&st.lock_room, &[&id]).map_err(pg_err)? else {
            return Err(StoreError::NotFound(format!("room {room}")));
        };
        let (head, part_size): (i64, i64) = (head.get(0), head.get(1));
        let (_, perms) = Self::member_perms(st, &mut tx, room, actor.0)?.ok_or(StoreError::NotMember(room))?;
        if !perms.contains(Permissions::POST) {
            return Err(StoreError::Forbidden(format!("you may not post in room {room}")));
        }
        let target = if kind == RecordKind::CALL_INVITE {
            None
        } else {
            let invite = tx
                .query_opt("SELECT kind FROM deltas WHERE room_id = $1 AND seq = $2", &[&id, &to_db(call)])
                .map_err(pg_err)?
                .map(|r| r.get::<_, i16>(0));
            if invite != Some(i16::from(RecordKind::CALL_INVITE.0)) {
                return Err(StoreError::NotFound(format!("no call {call} in room {room}")));
            }
            Some(to_db(call))
        };
        let delta = DeltaRecord {
            room,
            seq: from_db(head + 1),
            kind,
            author_id: actor.0,
            author: actor.1.into(),
            ts_ms: now_ms,
            body: data.into(),
            target: target.map(from_db),
        };
        Self::append_action(st, &mut tx, &delta, None, part_size)?;
        tx.commit().map_err(pg_err)?;
        Ok(delta)
    }

    fn define_role(
        &mut self,
        room: RoomId,
        actor: UserId,
        actor_name: &str,
        name: &str,
        perms: Option<Permissions>,
        now_ms: i64,
    ) -> Result<DeltaRecord> {
        let st = &self.st;
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let id = to_db(room);
        let Some(head) = tx.query_opt(&st.lock_room, &[&id]).map_err(pg_err)? else {
            return Err(StoreError::NotFound(format!("room {room}")));
        };
        let (head, part_size): (i64, i64) = (head.get(0), head.get(1));
        let kind = RoomKind(code(tx.query_one(&st.room_kind, &[&id]).map_err(pg_err)?.get(0))?);
        let (_, mine) = Self::member_perms(st, &mut tx, room, actor)?.ok_or(StoreError::NotMember(room))?;
        crate::check_not_direct(room, kind, "define roles in")?;
        crate::check_not_channel(room, kind, "define roles in")?;
        moderation::check_define(room, name, mine)?;
        match perms {
            Some(p) => tx.execute(
                "INSERT INTO room_roles (room_id, name, perms) VALUES ($1, $2, $3)
                 ON CONFLICT (room_id, name) DO UPDATE SET perms = excluded.perms",
                &[&id, &name, &i64::from(p.0)],
            ),
            None => tx.execute("DELETE FROM room_roles WHERE room_id = $1 AND name = $2", &[&id, &name]),
        }
        .map_err(pg_err)?;
        let delta = DeltaRecord {
            room,
            seq: from_db(head + 1),
            kind: RecordKind::ROLE_DEFINED,
            author_id: actor,
            author: actor_name.into(),
            ts_ms: now_ms,
            body: moderation::role_body(name, perms),
            target: None,
        };
        Self::append_action(st, &mut tx, &delta, None, part_size)?;
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
        let Some((_, perms)) = Self::member_perms(st, &mut tx, a.room, a.actor)? else {
            return Err(StoreError::NotMember(a.room));
        };
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
        match actions::judge(a.room, a.target, &a.action, a.actor, perms, found.as_ref())? {
            Verdict::AlreadyDone(seq) => {
                let ts_ms: i64 = tx.query_one(&st.delta_time, &[&room, &to_db(seq)]).map_err(pg_err)?.get(0);
                Ok(ActionOutcome::Unchanged { seq, ts_ms })
            }
            Verdict::Write => {
                let seq = head + 1;
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
                let key = Some(a.idempotency_key.as_str()).filter(|k| !k.is_empty());
                Self::append_action(st, &mut tx, &delta, key, part_size)?;
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
                    MessageAction::Reply { text } => {
                        Self::insert_mentions(&mut tx, a.room, from_db(seq), a.actor, text)?;
                        Ok(0)
                    }
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
                if a.action == MessageAction::Delete
                    && found.as_ref().is_some_and(|t| t.kind == RecordKind::FILE_SHARED)
                {
                    unshare_file(&mut tx, room, target)?;
                }
                tx.commit().map_err(pg_err)?;
                Ok(ActionOutcome::Applied(delta))
            }
        }
    }

    fn share_file(&mut self, f: &NewFile) -> Result<(FileRecord, DeltaRecord)> {
        let st = &self.st;
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let id = to_db(f.room);
        let Some(locked) = tx.query_opt(&st.lock_room, &[&id]).map_err(pg_err)? else {
            return Err(StoreError::NotFound(format!("room {}", f.room)));
        };
        let (head, part_size): (i64, i64) = (locked.get(0), locked.get(1));
        let (_, perms) = Self::member_perms(st, &mut tx, f.room, f.actor.0)?.ok_or(StoreError::NotMember(f.room))?;
        if !perms.contains(Permissions::POST) {
            return Err(StoreError::Forbidden(format!("you may not post in room {}", f.room)));
        }
        let removed = tx
            .execute("DELETE FROM uploads WHERE id = $1 AND user_id = $2", &[&to_db(f.upload), &to_db(f.actor.0)])
            .map_err(pg_err)?;
        if removed == 0 {
            return Err(StoreError::NotFound(format!("upload {}", f.upload)));
        }
        add_content_ref(&mut tx, &f.sha256, f.size, f.now_ms)?;
        let seq = head + 1;
        let file = FileRecord {
            id: 0,
            owner: f.actor.0,
            name: f.name.clone(),
            internal_name: hex::encode(f.sha256),
            uploaded_ms: f.now_ms,
            size: f.size,
            sha256: f.sha256,
            media_type: f.media_type.clone(),
            shared_in: (f.room, from_db(seq)),
        };
        let file = insert_file(&mut tx, file)?;
        let delta = DeltaRecord {
            room: f.room,
            seq: from_db(seq),
            kind: RecordKind::FILE_SHARED,
            author_id: f.actor.0,
            author: f.actor.1.clone(),
            ts_ms: f.now_ms,
            body: files::encode_body(&f.sha256, f.size, &f.media_type, &f.name, &f.caption),
            target: Some(Seq(file.id)),
        };
        Self::append_action(st, &mut tx, &delta, None, part_size)?;
        tx.commit().map_err(pg_err)?;
        Ok((file, delta))
    }

    fn forward(
        &mut self,
        actor: (UserId, &str),
        room: RoomId,
        seq: Seq,
        to_room: RoomId,
        now_ms: i64,
    ) -> Result<DeltaRecord> {
        let st = &self.st;
        let mut tx = self.client.transaction().map_err(pg_err)?;
        let id = to_db(to_room);
        let Some(locked) = tx.query_opt(&st.lock_room, &[&id]).map_err(pg_err)? else {
            return Err(StoreError::NotFound(format!("room {to_room}")));
        };
        let (head, part_size): (i64, i64) = (locked.get(0), locked.get(1));
        let indexed = indexable(locked.get(2))?;
        if Self::member_perms(st, &mut tx, room, actor.0)?.is_none() {
            let exists = tx.query_opt("SELECT 1 FROM rooms WHERE id = $1", &[&to_db(room)]).map_err(pg_err)?;
            return Err(match exists {
                Some(_) => StoreError::NotMember(room),
                None => StoreError::NotFound(format!("room {room}")),
            });
        }
        let (_, perms) = Self::member_perms(st, &mut tx, to_room, actor.0)?.ok_or(StoreError::NotMember(to_room))?;
        if !perms.contains(Permissions::POST) {
            return Err(StoreError::Forbidden(format!("you may not post in room {to_room}")));
        }
        let no_message = || StoreError::NotFound(format!("no message {seq} in room {room}"));
        let source = tx
            .query_opt(
                "SELECT d.kind, d.body, d.target, s.text, s.deleted_seq FROM deltas d
                 LEFT JOIN message_state s ON s.room_id = d.room_id AND s.seq = d.seq
                 WHERE d.room_id = $1 AND d.seq = $2",
                &[&to_db(room), &to_db(seq)],
            )
            .map_err(pg_err)?
            .ok_or_else(no_message)?;
        if source.get::<_, Option<i64>>(4).is_some() {
            return Err(no_message());
        }
        let kind = RecordKind(code(source.get(0))?);
        let body: String = source.get(1);
        let new_seq = head + 1;
        let (kind, body, target) = match kind {
            RecordKind::MESSAGE | RecordKind::REPLY => {
                (RecordKind::MESSAGE, source.get::<_, Option<String>>(3).unwrap_or(body), None)
            }
            RecordKind::FILE_SHARED => {
                let file: i64 = source.get::<_, Option<i64>>(2).ok_or_else(no_message)?;
                let original = tx
                    .query_opt(
                        "SELECT id, owner_id, name, internal_name, uploaded_at, size, sha256, media_type, room_id, seq
                         FROM files WHERE id = $1",
                        &[&file],
                    )
                    .map_err(pg_err)?
                    .map(|r| file_row(&r))
                    .ok_or_else(no_message)?;
                add_content_ref(&mut tx, &original.sha256, original.size, now_ms)?;
                let copy = FileRecord {
                    id: 0,
                    owner: actor.0,
                    uploaded_ms: now_ms,
                    shared_in: (to_room, from_db(new_seq)),
                    ..original
                };
                let copy = insert_file(&mut tx, copy)?;
                (RecordKind::FILE_SHARED, body, Some(Seq(copy.id)))
            }
            _ => return Err(StoreError::NotFound(format!("delta {seq} in room {room} is not a message"))),
        };
        let delta = DeltaRecord {
            room: to_room,
            seq: from_db(new_seq),
            kind,
            author_id: actor.0,
            author: actor.1.into(),
            ts_ms: now_ms,
            body,
            target,
        };
        Self::append_action(st, &mut tx, &delta, None, part_size)?;
        if kind == RecordKind::MESSAGE && indexed {
            Self::index_message(st, &mut tx, id, new_seq, &delta.body)?;
        }
        tx.commit().map_err(pg_err)?;
        Ok(delta)
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
                let role: Option<String> = row.get(0);
                let may_post = role.as_deref().is_some_and(|role| {
                    let defined = row.get::<_, Option<i64>>(4).map(|p| Permissions(u32::try_from(p).unwrap_or(0)));
                    let muted = row.get::<_, Option<bool>>(3).unwrap_or(false);
                    let post_roles: Option<String> = row.get(5);
                    let perms = moderation::effective(role, defined, muted);
                    crate::channel_perms(role, perms, post_roles.as_deref()).contains(Permissions::POST)
                });
                Probe { member: role.is_some(), may_post, existing: seq.zip(ts).map(|(seq, ts)| (from_db(seq), ts)) }
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
        for (outcome, post) in plan.outcomes.iter().zip(posts) {
            if let PostOutcome::Inserted(delta) = outcome {
                if post.text.contains('@') {
                    Self::insert_mentions(&mut tx, delta.room, delta.seq, delta.author_id, &post.text)?;
                }
            }
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
