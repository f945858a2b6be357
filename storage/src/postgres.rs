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

use crate::batch::{self, Probe};
use crate::{
    from_db, now_ms, to_db, DeltaRecord, MemberRecord, NewPost, NewSession, NotifyLevel, OpenOptions, PostOutcome,
    ProfileRecord, ProfileUpdate, RecordKind, Result, RoomDetailsRecord, RoomId, RoomKind, RoomRecord, Seq, SessionId,
    SessionLimits, SessionRecord, SettingWrite, SettingsRecord, SharedStore, Store, StoreError, UserId, UserRecord,
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
            ping: client.prepare("SELECT 1")?,
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
        Ok(PgStore { client, st })
    }
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

fn room_row(row: &Row) -> Result<RoomRecord> {
    Ok(RoomRecord {
        id: from_db(row.get(0)),
        name: row.get(1),
        kind: RoomKind(code(row.get(2))?),
        last_seq: from_db(row.get(3)),
    })
}

impl PgStore {
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
        let delta = DeltaRecord {
            room,
            seq: from_db(row.get(0)),
            kind,
            author_id: user,
            author: user_name.into(),
            ts_ms: now_ms,
            body: String::new(),
        };
        tx.execute(
            &st.insert_delta,
            &[&to_db(room), &to_db(delta.seq), &i16::from(kind.0), &to_db(user), &delta.body, &now_ms],
        )
        .map_err(pg_err)?;
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
        let mut tx = self.client.transaction().map_err(pg_err)?;
        Self::check_room_cap(&self.st, &mut tx, owner, max_rooms)?;
        let row =
            tx.query_one(&self.st.create_room, &[&name, &i16::from(kind.0), &to_db(owner), &now_ms]).map_err(pg_err)?;
        let id: i64 = row.get(0);
        tx.execute(&self.st.add_member, &[&id, &to_db(owner), &"owner", &now_ms]).map_err(pg_err)?;
        tx.execute(
            &self.st.insert_delta,
            &[&id, &1_i64, &i16::from(RecordKind::CREATE.0), &to_db(owner), &name, &now_ms],
        )
        .map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        Ok(crate::created_room(from_db(id), name, kind, owner, owner_name, now_ms))
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
        rows.iter()
            .map(|row| {
                Ok(DeltaRecord {
                    room,
                    seq: from_db(row.get(0)),
                    kind: RecordKind(code(row.get(1))?),
                    author_id: from_db(row.get(2)),
                    author: row.get(3),
                    ts_ms: row.get(4),
                    body: row.get(5),
                })
            })
            .collect()
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
        let delta = Self::membership_delta(&self.st, &mut tx, room, RecordKind::LEAVE, user, user_name, now_ms)?
            .ok_or(StoreError::NotMember(room))?;
        let removed = tx.execute(&self.st.remove_member, &[&to_db(room), &to_db(user)]).map_err(pg_err)?;
        if removed == 0 {
            return Err(StoreError::NotMember(room));
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
                    &i16::from(RecordKind::MESSAGE.0),
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
    fn push(&mut self, delta: &'a DeltaRecord, key: Option<&'a str>) {
        self.room.push(to_db(delta.room));
        self.seq.push(to_db(delta.seq));
        self.author.push(to_db(delta.author_id));
        self.body.push(&delta.body);
        self.created_at.push(delta.ts_ms);
        self.key.push(key);
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
