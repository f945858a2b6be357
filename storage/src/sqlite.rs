//! The embedded store: one SQLite file, one connection per [`SqliteStore`].
//!
//! Several worker threads open the same file, each with its own connection. WAL mode lets readers
//! run beside the one writer; every write transaction starts with `BEGIN IMMEDIATE`, so it takes
//! the write lock up front and waits (busy timeout) instead of failing halfway with
//! `SQLITE_BUSY` when another connection writes. `synchronous=FULL` makes a commit durable
//! against power loss before the method returns.
//!
//! Checkpoints (copying the WAL back into the database file) normally run inside whichever commit
//! crosses SQLite's threshold, which stalls that commit. With
//! [`OpenOptions::manual_checkpoints`](crate::OpenOptions::manual_checkpoints) a connection never
//! does so, and [`Store::checkpoint`] runs a passive one where the owner chooses (a housekeeping
//! thread).
//!
//! The file holds password hashes, session token hashes and every message, so a new one is created
//! readable by its owner only; SQLite gives the `-wal` and `-shm` files the database file's mode.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{ffi, params, Connection, OptionalExtension, Row, TransactionBehavior};

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
    refinery::embed_migrations!("migrations/sqlite");
}

/// Largest size a WAL file keeps once it is reset after a checkpoint. A WAL that grew during a
/// burst (or while checkpoints were held off) shrinks back to this instead of keeping its peak
/// size on disk for the life of the database.
const JOURNAL_SIZE_LIMIT: u64 = 64 << 20;

/// Migrations run one connection at a time: workers opening a fresh file together would otherwise
/// all try to create the same tables.
static MIGRATION_LOCK: Mutex<()> = Mutex::new(());

/// The embedded store: a connection to one SQLite database file.
pub struct SqliteStore {
    /// The connection, with its prepared statement cache.
    conn: Connection,
    /// The partition size of the rooms this store creates.
    partition_size: u64,
}

impl SqliteStore {
    /// [`SqliteStore::open_with`] with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// Opens (creating if needed, along with its parent directory) the database file at `path`,
    /// configures the connection and applies pending migrations. `Config` when the path can never
    /// work (a regular file where a directory should be, a directory where the file should be);
    /// `Unavailable` when it may work later (permissions, I/O errors, another process holding the
    /// lock a fresh database needs).
    pub fn open_with(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        prepare_file(path)?;
        let mut conn = Connection::open(path).map_err(|e| in_file(path, db_err(e)))?;
        // Held while setting WAL mode too: switching the journal mode of a fresh file needs an
        // exclusive lock.
        let _guard = MIGRATION_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        conn.busy_timeout(options.busy_timeout).map_err(db_err)?;
        let mode: String =
            conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(|e| in_file(path, db_err(e)))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Config(format!("{} cannot use WAL mode (journal mode is {mode})", path.display())));
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT};"
        ))
        .map_err(db_err)?;
        if options.manual_checkpoints {
            conn.execute_batch("PRAGMA wal_autocheckpoint = 0").map_err(db_err)?;
        }
        conn.set_prepared_statement_cache_capacity(64);
        embedded::migrations::runner().run(&mut conn).map_err(|e| {
            log::debug!("sqlite migration of {}: {e:?}", path.display());
            match crate::migration_cause::<rusqlite::Error>(&e).map(sqlite_error) {
                Some(unavailable @ StoreError::Unavailable(_)) => in_file(path, unavailable),
                _ => StoreError::Migration(e.to_string()),
            }
        })?;
        Ok(SqliteStore { conn, partition_size: options.partition_size.max(1) })
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`) and commits if it returns `Ok`.
    fn write<T>(&mut self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        let value = f(&tx)?;
        tx.commit().map_err(db_err)?;
        Ok(value)
    }

    /// Runs a passive checkpoint and returns how many frames the WAL holds and how many of them
    /// are now in the database file (equal when it caught up).
    fn wal_checkpoint(&mut self) -> Result<(i64, i64)> {
        // A checkpoint that finds another one running reports it in the first column rather than
        // failing: that one is doing the work, so "busy" is not an error here.
        self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get(1)?, row.get(2)?))).map_err(db_err)
    }
}

/// Applies the migrations up to `target` to the database file at `path` (see
/// [`crate::migrate_to`]).
pub(crate) fn migrate_to(path: &str, target: refinery::Target) -> Result<()> {
    prepare_file(Path::new(path))?;
    let mut conn = Connection::open(path).map_err(db_err)?;
    embedded::migrations::runner()
        .set_target(target)
        .run(&mut conn)
        .map(drop)
        .map_err(|e| StoreError::Migration(e.to_string()))
}

/// Makes sure the database file can be opened: creates its directory, creates a new file private
/// to its owner before SQLite would create it with the umask's mode, and warns when an existing
/// one is open to other users.
fn prepare_file(path: &Path) -> Result<()> {
    // Names SQLite gives a private temporary database rather than a file (which then fails the
    // WAL check): there is no file to prepare, and creating one by that name would litter.
    if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| io_err(format!("cannot create directory {}", parent.display()), &e))?;
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(StoreError::Config(format!("{} is a directory", path.display()))),
        Ok(_) => {
            warn_if_shared(path);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_private(path),
        Err(e) => Err(io_err(format!("cannot open {}", path.display()), &e)),
    }
}

/// Creates an empty database file with mode 0600 (SQLite takes an empty file for an empty
/// database).
#[cfg(unix)]
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        // The umask can only take bits away from 0600; setting the mode again makes it exactly
        // 0600 even under an umask that would leave the owner unable to write.
        Ok(file) => file
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err(format!("cannot set the mode of {}", path.display()), &e)),
        // Another worker opening the same new database got there first, and made it private too.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(format!("cannot create {}", path.display()), &e)),
    }
}

/// Elsewhere SQLite creates the file, and the directory's permissions decide who reads it.
#[cfg(not(unix))]
fn create_private(_path: &Path) -> Result<()> {
    Ok(())
}

/// The database file and its `-wal` and `-shm` companions that exist and that users other than
/// the owner may read or write, with their modes.
#[cfg(unix)]
fn shared_files(path: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let with_suffix = |suffix: &str| {
        let mut name = OsString::from(path.as_os_str());
        name.push(suffix);
        PathBuf::from(name)
    };
    [path.to_path_buf(), with_suffix("-wal"), with_suffix("-shm")]
        .into_iter()
        .filter_map(|file| {
            let mode = std::fs::metadata(&file).ok()?.permissions().mode() & 0o777;
            (mode & 0o066 != 0).then_some((file, mode))
        })
        .collect()
}

/// Warns, once per process and database, that its files are open to other users. Not fixed
/// silently: an operator may have opened them on purpose (a backup group).
#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    /// Databases already warned about: every worker opens the same file, and reopens it after an
    /// outage.
    static WARNED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let shared = shared_files(path);
    if shared.is_empty() {
        return;
    }
    let mut warned = WARNED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if warned.iter().any(|p| p == path) {
        return;
    }
    warned.push(path.to_path_buf());
    let names: Vec<String> = shared.iter().map(|(file, _)| file.display().to_string()).collect();
    let modes: Vec<String> = shared.iter().map(|(file, mode)| format!("{} is {mode:o}", file.display())).collect();
    log::warn!(
        "the database holds password and session hashes and every message, but other users may read or write it \
         ({}); fix with: chmod 600 {}",
        modes.join(", "),
        names.join(" ")
    );
}

#[cfg(not(unix))]
fn warn_if_shared(_path: &Path) {}

/// Maps an I/O error met while preparing the database file: a path that can never work is a
/// `Config` error, anything else (permissions, a full or read-only file system, an I/O error)
/// may pass and is `Unavailable`.
fn io_err(what: String, e: &std::io::Error) -> StoreError {
    use std::io::ErrorKind;
    log::debug!("sqlite: {what}: {e:?}");
    match e.kind() {
        ErrorKind::NotADirectory | ErrorKind::IsADirectory | ErrorKind::AlreadyExists | ErrorKind::InvalidInput => {
            StoreError::Config(format!("{what}: {e}"))
        }
        _ => StoreError::Unavailable(format!("{what}: {e}")),
    }
}

/// Names the file in an error's message (SQLite's messages do not).
fn in_file(path: &Path, e: StoreError) -> StoreError {
    let at = |message: String| format!("{}: {message}", path.display());
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(at(m)),
        StoreError::Database(m) => StoreError::Database(at(m)),
        other => other,
    }
}

/// Maps a SQLite error and logs it at debug level (the owner of the store reports outages).
fn db_err(e: rusqlite::Error) -> StoreError {
    log::debug!("sqlite: {e:?}");
    sqlite_error(&e)
}

/// Maps a SQLite error: a unique violation is a `Conflict`, a missing referenced row `NotFound`;
/// a full disk, a lock held past the busy timeout, a read-only or vanished file and I/O errors
/// are `Unavailable`; anything else is `Database`.
fn sqlite_error(e: &rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(code, _) = e {
        // The primary result code is the low byte of the extended one, which covers every
        // extended code of a class (SQLITE_IOERR_FSYNC, SQLITE_BUSY_SNAPSHOT, ...).
        match code.extended_code & 0xff {
            ffi::SQLITE_FULL
            | ffi::SQLITE_BUSY
            | ffi::SQLITE_LOCKED
            | ffi::SQLITE_READONLY
            | ffi::SQLITE_IOERR
            | ffi::SQLITE_CANTOPEN
            | ffi::SQLITE_PROTOCOL
            | ffi::SQLITE_NOMEM => return StoreError::Unavailable(e.to_string()),
            ffi::SQLITE_CONSTRAINT => match code.extended_code {
                ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                    return StoreError::Conflict(e.to_string())
                }
                ffi::SQLITE_CONSTRAINT_FOREIGNKEY => return StoreError::NotFound(e.to_string()),
                _ => {}
            },
            _ => {}
        }
    }
    StoreError::Database(e.to_string())
}

fn user_row(row: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord { id: from_db(row.get(0)?), name: row.get(1)?, password_hash: row.get(2)? })
}

/// The columns [`profile_row`] reads, in its order.
const PROFILE_COLUMNS: &str = "id, name, email, display_name";

fn profile_row(row: &Row<'_>) -> rusqlite::Result<ProfileRecord> {
    Ok(ProfileRecord { id: from_db(row.get(0)?), name: row.get(1)?, email: row.get(2)?, display_name: row.get(3)? })
}

/// A stored notification level; a code the schema's CHECK lets through but this build does not
/// know is a database error, not a guess.
fn notify_level(code: i64) -> Result<NotifyLevel> {
    NotifyLevel::from_code(code).ok_or_else(|| StoreError::Database(format!("notify level {code} out of range")))
}

/// The columns [`session_row`] reads, in its order.
const SESSION_COLUMNS: &str = "id, user_id, ip, user_agent, created_at, last_used_at";

fn session_row(row: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        id: from_db(row.get(0)?),
        user_id: from_db(row.get(1)?),
        ip: row.get(2)?,
        user_agent: row.get(3)?,
        created_at_ms: row.get(4)?,
        last_used_at_ms: row.get(5)?,
    })
}

fn room_row(row: &Row<'_>) -> rusqlite::Result<RoomRecord> {
    Ok(RoomRecord {
        id: from_db(row.get(0)?),
        name: row.get(1)?,
        kind: RoomKind(row.get(2)?),
        last_seq: from_db(row.get(3)?),
    })
}

/// What a write to a room's log needs to know about the room besides its head.
#[derive(Debug, Clone, Copy)]
struct LogInfo {
    /// Deltas per partition of its log.
    part_size: u64,
    /// Its kind: whether its messages are indexed for search.
    kind: RoomKind,
}

/// A delta of `room` from the columns `seq, kind, author_id, author name, created_at, body,
/// target`.
fn delta_row(room: RoomId, row: &Row<'_>) -> rusqlite::Result<DeltaRecord> {
    Ok(DeltaRecord {
        room,
        seq: from_db(row.get(0)?),
        kind: RecordKind(row.get(1)?),
        author_id: from_db(row.get(2)?),
        author: row.get(3)?,
        ts_ms: row.get(4)?,
        body: row.get(5)?,
        target: row.get::<_, Option<i64>>(6)?.map(from_db),
    })
}

/// The columns [`message_row`] reads, in its order, from `deltas d`, `users u` and
/// `message_state s`.
const MESSAGE_COLUMNS: &str = "d.seq, d.author_id, u.name, d.created_at, d.body, d.target, d.kind,
     s.text, s.edited_at, s.deleted_seq, s.pinned_seq";

/// A message in its current state (without its reactions) from [`MESSAGE_COLUMNS`].
fn message_row(row: &Row<'_>) -> rusqlite::Result<MessageRecord> {
    let kind = RecordKind(row.get(6)?);
    let deleted = row.get::<_, Option<i64>>(9)?.is_some();
    let edited: Option<String> = row.get(7)?;
    let text = if deleted { None } else { Some(edited.map_or_else(|| row.get(4), Ok)?) };
    Ok(MessageRecord {
        seq: from_db(row.get(0)?),
        author_id: from_db(row.get(1)?),
        author: row.get(2)?,
        ts_ms: row.get(3)?,
        text,
        edited_ms: row.get(8)?,
        deleted,
        reply_to: if kind == RecordKind::REPLY { row.get::<_, Option<i64>>(5)?.map(from_db) } else { None },
        pinned: row.get::<_, Option<i64>>(10)?.is_some(),
        reactions: Vec::new(),
    })
}

/// Reaction counts of room `?1` with whether user `?4` made one: `seq, emoji, count, mine`; the
/// caller adds the seqs wanted.
const REACTIONS: &str = "SELECT r.seq, r.emoji, r.count, EXISTS (SELECT 1 FROM reaction_users ru
         WHERE ru.room_id = r.room_id AND ru.seq = r.seq AND ru.emoji = r.emoji AND ru.user_id = ?4)
     FROM reactions r WHERE r.room_id = ?1";

fn reaction_row(row: &Row<'_>) -> rusqlite::Result<(i64, String, i64, bool)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
}

/// A page of search results: the newest `?4` documents matching `?1` with keys in `(?2, ?3]`,
/// room `?5`'s messages with seqs key - `?2`, in their current state, newest first.
///
/// CROSS JOIN keeps the page of matches the outer loop (SQLite never reorders a CROSS JOIN): left
/// to itself the planner walked the room's whole log and probed the matches for every delta, 30 s
/// for a common word in a room of 100,000 messages.
fn search_sql() -> String {
    format!(
        "SELECT {MESSAGE_COLUMNS}
         FROM (SELECT rowid AS doc FROM message_search
               WHERE message_search MATCH ?1 AND rowid > ?2 AND rowid <= ?3
               ORDER BY rowid DESC LIMIT ?4) f
         CROSS JOIN deltas d ON d.room_id = ?5 AND d.seq = f.doc - ?2
         JOIN users u ON u.id = d.author_id
         LEFT JOIN message_state s ON s.room_id = d.room_id AND s.seq = d.seq
         ORDER BY d.seq DESC"
    )
}

/// Refuses a read of a room by a user who is not a member (`NotFound` when there is no room).
fn check_member(conn: &Connection, room: RoomId, user: UserId) -> Result<()> {
    if !exists(conn, room)? {
        return Err(StoreError::NotFound(format!("room {room}")));
    }
    if !is_member(conn, room, user)? {
        return Err(StoreError::NotMember(room));
    }
    Ok(())
}

/// A `(last_seq, part_size, kind)` row as a head and its room's log settings.
fn log_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(u64, LogInfo)> {
    let info = LogInfo { part_size: from_db(row.get(1)?), kind: RoomKind(row.get(2)?) };
    Ok((from_db(row.get::<_, i64>(0)?), info))
}

/// Bumps a room's head by one and returns the new seq with the room's log settings, or `None`
/// when the room does not exist.
fn next_seq(conn: &Connection, room: RoomId) -> Result<Option<(u64, LogInfo)>> {
    conn.prepare_cached("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq, part_size, kind")
        .and_then(|mut st| st.query_row([to_db(room)], log_row).optional())
        .map_err(db_err)
}

/// A room's head and log settings, `None` when the room does not exist.
fn log_state(conn: &Connection, room: RoomId) -> Result<Option<(u64, LogInfo)>> {
    conn.prepare_cached("SELECT last_seq, part_size, kind FROM rooms WHERE id = ?1")
        .and_then(|mut st| st.query_row([to_db(room)], log_row).optional())
        .map_err(db_err)
}

/// Merges what new deltas add to their partitions into `delta_partitions`: one upsert per
/// (room, partition) in `rows`, which is one per room for a group commit that stays in a
/// partition.
fn record_partitions(conn: &Connection, rows: &[PartitionRecord]) -> Result<()> {
    for p in rows {
        conn.prepare_cached(
            "INSERT INTO delta_partitions (room_id, part, first_seq, last_seq, first_ts, last_ts, count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (room_id, part) DO UPDATE SET
                 first_seq = min(first_seq, excluded.first_seq), last_seq = max(last_seq, excluded.last_seq),
                 first_ts = min(first_ts, excluded.first_ts), last_ts = max(last_ts, excluded.last_ts),
                 count = count + excluded.count",
        )
        .and_then(|mut st| {
            st.execute(params![
                to_db(p.room),
                to_db(p.part),
                to_db(p.first_seq),
                to_db(p.last_seq),
                p.first_ts_ms,
                p.last_ts_ms,
                to_db(p.count)
            ])
        })
        .map_err(db_err)?;
    }
    Ok(())
}

/// Appends one delta and records it in its partition.
fn append_delta(conn: &Connection, delta: &DeltaRecord, key: Option<&str>, part_size: u64) -> Result<()> {
    insert_delta(conn, delta, key)?;
    record_partitions(conn, &partition::summarize([delta], |_| part_size))
}

/// Indexes a message's text for search, if its room is indexable and the text has words.
fn index_message(conn: &Connection, room: RoomId, seq: Seq, kind: RoomKind, text: &str) -> Result<()> {
    let Some(doc) = search::doc_id(room, seq).filter(|_| search::indexable(kind)) else { return Ok(()) };
    let words = search::index_text(text);
    if words.is_empty() {
        return Ok(());
    }
    conn.prepare_cached("INSERT INTO message_search (rowid, words) VALUES (?1, ?2)")
        .and_then(|mut st| st.execute(params![doc, words]))
        .map(drop)
        .map_err(db_err)
}

/// Removes a message from the search index (nothing when it was not in it).
fn unindex_message(conn: &Connection, room: RoomId, seq: Seq) -> Result<()> {
    let Some(doc) = search::doc_id(room, seq) else { return Ok(()) };
    conn.prepare_cached("DELETE FROM message_search WHERE rowid = ?1")
        .and_then(|mut st| st.execute([doc]))
        .map(drop)
        .map_err(db_err)
}

/// Inserts one delta row.
fn insert_delta(conn: &Connection, delta: &DeltaRecord, key: Option<&str>) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at, idempotency_key, target)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut st| {
        st.execute(params![
            to_db(delta.room),
            to_db(delta.seq),
            delta.kind.0,
            to_db(delta.author_id),
            delta.body,
            delta.ts_ms,
            key,
            delta.target.map(to_db),
        ])
    })
    .map(drop)
    .map_err(db_err)
}

/// Appends a membership delta (`JOIN`, `LEAVE`) with the room's next seq.
fn membership_delta(
    conn: &Connection,
    room: RoomId,
    kind: RecordKind,
    user: UserId,
    user_name: &str,
    now_ms: i64,
) -> Result<Option<DeltaRecord>> {
    let Some((seq, log)) = next_seq(conn, room)? else { return Ok(None) };
    let delta = DeltaRecord {
        room,
        seq: Seq(seq),
        kind,
        author_id: user,
        author: user_name.into(),
        ts_ms: now_ms,
        body: String::new(),
        target: None,
    };
    append_delta(conn, &delta, None, log.part_size)?;
    Ok(Some(delta))
}

impl SharedStore for SqliteStore {
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

    fn create_session(&mut self, session: &NewSession) -> Result<SessionRecord> {
        self.write(|conn| {
            let id: i64 = conn
                .prepare_cached(
                    "INSERT INTO sessions (user_id, token_hash, ip, user_agent, created_at, last_used_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5) RETURNING id",
                )
                .and_then(|mut st| {
                    st.query_row(
                        params![
                            to_db(session.user_id),
                            &session.token_hash[..],
                            session.ip,
                            session.user_agent,
                            session.now_ms,
                        ],
                        |row| row.get(0),
                    )
                })
                .map_err(db_err)?;
            Ok(crate::created_session(from_db(id), session))
        })
    }

    fn session_user(
        &mut self,
        token_hash: &[u8; 32],
        now_ms: i64,
        limits: &SessionLimits,
    ) -> Result<Option<(UserRecord, SessionRecord)>> {
        self.write(|conn| {
            let session = conn
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions WHERE token_hash = ?1 AND revoked_at IS NULL"
                ))
                .and_then(|mut st| st.query_row([&token_hash[..]], session_row).optional())
                .map_err(db_err)?;
            let Some(session) = session else { return Ok(None) };
            if !limits.is_live(&session, now_ms) {
                // Committed with the transaction: an expired session stays dead even if the
                // limits are raised later.
                conn.prepare_cached("UPDATE sessions SET revoked_at = ?2 WHERE id = ?1")
                    .and_then(|mut st| st.execute(params![to_db(session.id), now_ms]))
                    .map_err(db_err)?;
                return Ok(None);
            }
            let last_used_at_ms = touch(conn, session.id, now_ms)?.unwrap_or(session.last_used_at_ms);
            // SQLite's RETURNING cannot see joined tables, hence a statement of its own.
            let user = conn
                .prepare_cached("SELECT id, name, password_hash FROM users WHERE id = ?1")
                .and_then(|mut st| st.query_row([to_db(session.user_id)], user_row).optional())
                .map_err(db_err)?;
            Ok(user.map(|user| (user, SessionRecord { last_used_at_ms, ..session })))
        })
    }

    fn list_sessions(&mut self, user: UserId, now_ms: i64, limits: &SessionLimits) -> Result<Vec<SessionRecord>> {
        let sessions: Vec<SessionRecord> = self
            .conn
            .prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = ?1 AND revoked_at IS NULL ORDER BY id"
            ))
            .and_then(|mut st| st.query_map([to_db(user)], session_row)?.collect())
            .map_err(db_err)?;
        Ok(sessions.into_iter().filter(|s| limits.is_live(s, now_ms)).collect())
    }

    fn revoke_sessions(&mut self, user: UserId, which: Option<SessionId>, now_ms: i64) -> Result<Vec<SessionId>> {
        self.write(|conn| {
            let mut ids: Vec<SessionId> = conn
                .prepare_cached(
                    "UPDATE sessions SET revoked_at = ?3
                     WHERE user_id = ?1 AND revoked_at IS NULL AND (?2 IS NULL OR id = ?2) RETURNING id",
                )
                .and_then(|mut st| {
                    st.query_map(params![to_db(user), which.map(to_db), now_ms], |row| row.get(0).map(from_db))?
                        .collect()
                })
                .map_err(db_err)?;
            // RETURNING gives rows in no promised order.
            ids.sort_unstable();
            Ok(ids)
        })
    }

    fn touch_sessions(&mut self, sessions: &[SessionId], now_ms: i64) -> Result<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        self.write(|conn| sessions.iter().try_for_each(|&session| touch(conn, session, now_ms).map(drop)))
    }

    fn profile(&mut self, user: UserId) -> Result<Option<ProfileRecord>> {
        self.conn
            .prepare_cached(&format!("SELECT {PROFILE_COLUMNS} FROM users WHERE id = ?1"))
            .and_then(|mut st| st.query_row([to_db(user)], profile_row).optional())
            .map_err(db_err)
    }

    fn profile_by_name(&mut self, name: &str) -> Result<Option<ProfileRecord>> {
        self.conn
            .prepare_cached(&format!("SELECT {PROFILE_COLUMNS} FROM users WHERE name = ?1"))
            .and_then(|mut st| st.query_row([name], profile_row).optional())
            .map_err(db_err)
    }

    fn update_profile(&mut self, user: UserId, update: &ProfileUpdate) -> Result<ProfileRecord> {
        let email = update.email.as_ref().map(Option::as_deref);
        let key = email.map(|e| e.map(crate::email_key));
        self.write(|conn| {
            conn.prepare_cached(&format!(
                "UPDATE users SET email = CASE WHEN ?2 THEN ?3 ELSE email END,
                                  email_key = CASE WHEN ?2 THEN ?4 ELSE email_key END,
                                  display_name = coalesce(?5, display_name)
                 WHERE id = ?1 RETURNING {PROFILE_COLUMNS}"
            ))
            .and_then(|mut st| {
                st.query_row(
                    params![to_db(user), email.is_some(), email.flatten(), key.flatten(), update.display_name],
                    profile_row,
                )
                .optional()
            })
            .map_err(|e| crate::email_taken(db_err(e), update))?
            .ok_or_else(|| StoreError::NotFound(format!("user {user}")))
        })
    }

    fn set_setting(&mut self, user: UserId, setting: &SettingWrite<'_>) -> Result<u64> {
        self.write(|conn| {
            let version: i64 = conn
                .prepare_cached(
                    "UPDATE users SET settings_version = settings_version + 1 WHERE id = ?1
                     RETURNING settings_version",
                )
                .and_then(|mut st| st.query_row([to_db(user)], |row| row.get(0)).optional())
                .map_err(db_err)?
                .ok_or_else(|| StoreError::NotFound(format!("user {user}")))?;
            match *setting {
                SettingWrite::Notify { room, level } => {
                    let updated = conn
                        .prepare_cached("UPDATE room_members SET notify = ?3 WHERE room_id = ?1 AND user_id = ?2")
                        .and_then(|mut st| st.execute(params![to_db(room), to_db(user), level.code()]))
                        .map_err(db_err)?;
                    // Returning the error drops the transaction: the version bump goes with it.
                    if updated == 0 {
                        return Err(StoreError::NotMember(room));
                    }
                }
                SettingWrite::Account { key, value } => {
                    conn.prepare_cached(
                        "INSERT INTO user_settings (user_id, key, value) VALUES (?1, ?2, ?3)
                         ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value",
                    )
                    .and_then(|mut st| st.execute(params![to_db(user), key, value]))
                    .map_err(db_err)?;
                }
            }
            Ok(from_db(version))
        })
    }

    fn settings(&mut self, user: UserId, after_room: RoomId, limit: u32) -> Result<SettingsRecord> {
        // A read transaction: the version and the rows come from one snapshot of the WAL, so a
        // change committed between the reads cannot show in one and not the other.
        let tx = self.conn.transaction().map_err(db_err)?;
        let version: i64 = tx
            .prepare_cached("SELECT settings_version FROM users WHERE id = ?1")
            .and_then(|mut st| st.query_row([to_db(user)], |row| row.get(0)).optional())
            .map_err(db_err)?
            .ok_or_else(|| StoreError::NotFound(format!("user {user}")))?;
        let account = tx
            .prepare_cached("SELECT key, value FROM user_settings WHERE user_id = ?1 ORDER BY key")
            .and_then(|mut st| st.query_map([to_db(user)], |row| Ok((row.get(0)?, row.get(1)?)))?.collect())
            .map_err(db_err)?;
        let rows: Vec<(i64, i64)> = tx
            .prepare_cached(
                "SELECT room_id, notify FROM room_members WHERE user_id = ?1 AND notify <> 0 AND room_id > ?2
                 ORDER BY room_id LIMIT ?3",
            )
            .and_then(|mut st| {
                st.query_map(params![to_db(user), to_db(after_room), limit], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect()
            })
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        let notify =
            rows.into_iter().map(|(room, code)| Ok((from_db(room), notify_level(code)?))).collect::<Result<_>>()?;
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
        let part_size = self.partition_size;
        self.write(|conn| {
            // BEGIN IMMEDIATE serializes writers, so the count cannot change before the insert.
            crate::check_room_cap(owner, room_count(conn, owner)?, max_rooms)?;
            let id: i64 = conn
                .prepare_cached(
                    "INSERT INTO rooms (name, kind, last_seq, created_by, created_at, part_size)
                     VALUES (?1, ?2, 1, ?3, ?4, ?5) RETURNING id",
                )
                .and_then(|mut st| {
                    st.query_row(params![name, kind.0, to_db(owner), now_ms, to_db(part_size)], |row| row.get(0))
                })
                .map_err(db_err)?;
            add_member(conn, from_db(id), owner, "owner", now_ms)?;
            let (room, delta) = crate::created_room(from_db(id), name, kind, owner, owner_name, now_ms);
            append_delta(conn, &delta, None, part_size)?;
            Ok((room, delta))
        })
    }

    fn open_direct(
        &mut self,
        user: UserId,
        user_name: &str,
        peer: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> Result<DirectRoom> {
        let part_size = self.partition_size;
        self.write(|conn| {
            let peer_id: UserId = conn
                .prepare_cached("SELECT id FROM users WHERE name = ?1")
                .and_then(|mut st| st.query_row([peer], |row| row.get::<_, i64>(0)).optional())
                .map_err(db_err)?
                .map(from_db)
                .ok_or_else(|| StoreError::NotFound(format!("user {peer}")))?;
            let (lo, hi) = if user < peer_id { (user, peer_id) } else { (peer_id, user) };
            // BEGIN IMMEDIATE serializes writers: two sides asking at once find the first's room.
            let existing: Option<i64> = conn
                .prepare_cached("SELECT room_id FROM direct_rooms WHERE user_lo = ?1 AND user_hi = ?2")
                .and_then(|mut st| st.query_row(params![to_db(lo), to_db(hi)], |row| row.get(0)).optional())
                .map_err(db_err)?;
            if let Some(id) = existing {
                let room = conn
                    .prepare_cached("SELECT id, name, kind, last_seq FROM rooms WHERE id = ?1")
                    .and_then(|mut st| st.query_row([id], room_row))
                    .map_err(db_err)?;
                return Ok(DirectRoom { room, peer: peer_id, created: None });
            }
            crate::check_room_cap(user, room_count(conn, user)?, max_rooms)?;
            crate::check_room_cap(peer_id, room_count(conn, peer_id)?, max_rooms)?;
            let name = crate::direct_name((user, user_name), (peer_id, peer));
            let id: i64 = conn
                .prepare_cached(
                    "INSERT INTO rooms (name, kind, last_seq, created_by, created_at, part_size)
                     VALUES (?1, ?2, 1, ?3, ?4, ?5) RETURNING id",
                )
                .and_then(|mut st| {
                    st.query_row(params![name, RoomKind::DIRECT.0, to_db(user), now_ms, to_db(part_size)], |row| {
                        row.get(0)
                    })
                })
                .map_err(db_err)?;
            add_member(conn, from_db(id), user, "member", now_ms)?;
            add_member(conn, from_db(id), peer_id, "member", now_ms)?;
            conn.prepare_cached("INSERT INTO direct_rooms (user_lo, user_hi, room_id) VALUES (?1, ?2, ?3)")
                .and_then(|mut st| st.execute(params![to_db(lo), to_db(hi), id]))
                .map_err(db_err)?;
            let (room, delta) = crate::created_room(from_db(id), &name, RoomKind::DIRECT, user, user_name, now_ms);
            append_delta(conn, &delta, None, part_size)?;
            Ok(DirectRoom { room, peer: peer_id, created: Some(delta) })
        })
    }

    fn create_server(&mut self, s: &NewServer, max_servers: u64) -> Result<(ServerRecord, RoomRecord, DeltaRecord)> {
        let part_size = self.partition_size;
        self.write(|conn| {
            crate::check_server_cap(s.owner, server_count(conn, s.owner)?, max_servers)?;
            let id: i64 = conn
                .prepare_cached(
                    "INSERT INTO servers (name, description, public, owner_id, member_cap, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                )
                .and_then(|mut st| {
                    st.query_row(
                        params![s.name, s.description, s.public, to_db(s.owner), to_db(s.member_cap), s.now_ms],
                        |row| row.get(0),
                    )
                })
                .map_err(db_err)?;
            let server: ServerId = from_db(id);
            exec(
                conn,
                "INSERT INTO server_members (server_id, user_id, role, joined_at) VALUES (?1, ?2, 'owner', ?3)",
                params![id, to_db(s.owner), s.now_ms],
            )?;
            let (room, delta) = insert_room(
                conn,
                "general",
                RoomKind::CHANNEL,
                (s.owner, &s.owner_name),
                s.now_ms,
                Some((server, None, None)),
                part_size,
            )?;
            let record =
                server_of(conn, server, s.owner)?.ok_or_else(|| StoreError::NotFound(format!("server {server}")))?;
            Ok((record, room, delta))
        })
    }

    fn join_server(
        &mut self,
        server: ServerId,
        user: UserId,
        now_ms: i64,
        max_servers: u64,
    ) -> Result<(ServerRecord, Vec<RoomRecord>, bool)> {
        self.write(|conn| {
            let record =
                server_of(conn, server, user)?.ok_or_else(|| StoreError::NotFound(format!("server {server}")))?;
            if record.role.is_some() {
                return Ok((record, readable_channels(conn, server, user)?, false));
            }
            let (banned, invited) = server_standing(conn, server, user)?;
            if banned {
                return Err(StoreError::Forbidden(format!("you are banned from server {server}")));
            }
            if !record.public && !invited {
                return Err(StoreError::Forbidden(format!("server {server} is private: join by invitation")));
            }
            if record.members >= record.member_cap {
                return Err(StoreError::LimitReached(format!(
                    "server {server} has {} members, its cap",
                    record.members
                )));
            }
            exec(
                conn,
                "DELETE FROM server_invites WHERE server_id = ?1 AND user_id = ?2",
                params![to_db(server), to_db(user)],
            )?;
            crate::check_server_cap(user, server_count(conn, user)?, max_servers)?;
            exec(
                conn,
                "INSERT INTO server_members (server_id, user_id, role, joined_at) VALUES (?1, ?2, 'member', ?3)",
                params![to_db(server), to_db(user), now_ms],
            )?;
            let record =
                server_of(conn, server, user)?.ok_or_else(|| StoreError::NotFound(format!("server {server}")))?;
            Ok((record, readable_channels(conn, server, user)?, true))
        })
    }

    fn leave_server(&mut self, server: ServerId, user: UserId) -> Result<Vec<RoomId>> {
        self.write(|conn| {
            let record =
                server_of(conn, server, user)?.ok_or_else(|| StoreError::NotFound(format!("server {server}")))?;
            match record.role.as_deref() {
                None => return Err(StoreError::NotFound(format!("you are not a member of server {server}"))),
                Some("owner") => return Err(StoreError::Forbidden(format!("the owner cannot leave server {server}"))),
                Some(_) => {}
            }
            let channels = readable_channels(conn, server, user)?.into_iter().map(|r| r.id).collect();
            exec(
                conn,
                "DELETE FROM server_members WHERE server_id = ?1 AND user_id = ?2",
                params![to_db(server), to_db(user)],
            )?;
            Ok(channels)
        })
    }

    fn servers_page(&mut self, user: UserId, after: ServerId, limit: u32) -> Result<Vec<ServerRecord>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {SERVER_COLUMNS} FROM server_members m JOIN servers s ON s.id = m.server_id
                 WHERE m.user_id = ?1 AND m.server_id > ?2 ORDER BY m.server_id LIMIT ?3"
            ))
            .and_then(|mut st| st.query_map(params![to_db(user), to_db(after), limit], server_row)?.collect())
            .map_err(db_err)
    }

    fn create_channel(&mut self, c: &NewChannel) -> Result<(RoomRecord, DeltaRecord)> {
        let part_size = self.partition_size;
        self.write(|conn| {
            if server_of(conn, c.server, c.actor)?.is_none() {
                return Err(StoreError::NotFound(format!("server {}", c.server)));
            }
            let (_, perms) = server_perms(conn, c.server, c.actor)?
                .ok_or_else(|| StoreError::NotFound(format!("you are not a member of server {}", c.server)))?;
            if !perms.contains(Permissions::MANAGE_CHANNELS) {
                return Err(StoreError::Forbidden(format!(
                    "your role in server {} does not allow manage_channels",
                    c.server
                )));
            }
            let rules = Some((c.server, crate::role_list(&c.read_roles), crate::role_list(&c.post_roles)));
            insert_room(conn, &c.name, c.kind, (c.actor, &c.actor_name), c.now_ms, rules, part_size)
        })
    }

    fn set_server_role(&mut self, server: ServerId, actor: UserId, target: &str, role: &str) -> Result<bool> {
        self.write(|conn| {
            let (actor_role, perms) = server_perms(conn, server, actor)?
                .ok_or_else(|| StoreError::NotFound(format!("you are not a member of server {server}")))?;
            let target_id: UserId = conn
                .prepare_cached("SELECT id FROM users WHERE name = ?1")
                .and_then(|mut st| st.query_row([target], |row| row.get::<_, i64>(0)).optional())
                .map_err(db_err)?
                .map(from_db)
                .ok_or_else(|| StoreError::NotFound(format!("user {target}")))?;
            let current = server_perms(conn, server, target_id)?.map(|(r, _)| r);
            let state = MemberState { role: current, muted: false, banned: false };
            let known = Permissions::of_builtin(role).is_some()
                || conn
                    .prepare_cached("SELECT 1 FROM server_roles WHERE server_id = ?1 AND name = ?2")
                    .and_then(|mut st| st.exists(params![to_db(server), role]))
                    .map_err(db_err)?;
            let action = MemberAction::SetRole(role.to_string());
            let room = RoomId(0);
            match moderation::judge(room, &action, (actor, &actor_role, perms), (target_id, target, &state), known)? {
                ModVerdict::Unchanged => Ok(false),
                ModVerdict::Write => {
                    exec(
                        conn,
                        "UPDATE server_members SET role = ?3 WHERE server_id = ?1 AND user_id = ?2",
                        params![to_db(server), to_db(target_id), role],
                    )?;
                    Ok(true)
                }
            }
        })
    }

    fn define_server_role(
        &mut self,
        server: ServerId,
        actor: UserId,
        name: &str,
        perms: Option<Permissions>,
    ) -> Result<()> {
        self.write(|conn| {
            let (_, mine) = server_perms(conn, server, actor)?
                .ok_or_else(|| StoreError::NotFound(format!("you are not a member of server {server}")))?;
            moderation::check_define(RoomId(0), name, mine)?;
            match perms {
                Some(p) => exec(
                    conn,
                    "INSERT INTO server_roles (server_id, name, perms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (server_id, name) DO UPDATE SET perms = excluded.perms",
                    params![to_db(server), name, i64::from(p.0)],
                )?,
                None => exec(
                    conn,
                    "DELETE FROM server_roles WHERE server_id = ?1 AND name = ?2",
                    params![to_db(server), name],
                )?,
            };
            Ok(())
        })
    }

    fn room(&mut self, room: RoomId) -> Result<Option<RoomRecord>> {
        self.conn
            .prepare_cached("SELECT id, name, kind, last_seq FROM rooms WHERE id = ?1")
            .and_then(|mut st| st.query_row([to_db(room)], room_row).optional())
            .map_err(db_err)
    }

    fn rooms_of_user(&mut self, user: UserId) -> Result<Vec<RoomRecord>> {
        self.conn
            .prepare_cached(
                "SELECT r.id, r.name, r.kind, r.last_seq FROM room_members m
                 JOIN rooms r ON r.id = m.room_id WHERE m.user_id = ?1
                 UNION ALL
                 SELECT r.id, r.name, r.kind, r.last_seq FROM server_members sm
                 JOIN rooms r ON r.server_id = sm.server_id
                 WHERE sm.user_id = ?1 AND (r.read_roles IS NULL OR sm.role IN ('owner', 'admin')
                       OR instr(',' || r.read_roles || ',', ',' || sm.role || ',') > 0)
                 ORDER BY 1",
            )
            .and_then(|mut st| st.query_map([to_db(user)], room_row)?.collect())
            .map_err(db_err)
    }

    fn rooms_page(&mut self, user: UserId, after_room: RoomId, limit: u32) -> Result<Vec<RoomRecord>> {
        self.conn
            .prepare_cached(
                "SELECT r.id, r.name, r.kind, r.last_seq FROM room_members m
                 JOIN rooms r ON r.id = m.room_id WHERE m.user_id = ?1 AND m.room_id > ?2
                 UNION ALL
                 SELECT r.id, r.name, r.kind, r.last_seq FROM server_members sm
                 JOIN rooms r ON r.server_id = sm.server_id
                 WHERE sm.user_id = ?1 AND r.id > ?2 AND (r.read_roles IS NULL OR sm.role IN ('owner', 'admin')
                       OR instr(',' || r.read_roles || ',', ',' || sm.role || ',') > 0)
                 ORDER BY 1 LIMIT ?3",
            )
            .and_then(|mut st| st.query_map(params![to_db(user), to_db(after_room), limit], room_row)?.collect())
            .map_err(db_err)
    }

    fn is_member(&mut self, room: RoomId, user: UserId) -> Result<bool> {
        is_member(&self.conn, room, user)
    }

    fn room_details(&mut self, room: RoomId, user: UserId) -> Result<Option<RoomDetailsRecord>> {
        self.conn
            .prepare_cached(
                "SELECT r.id, r.name, r.kind, r.last_seq,
                        coalesce((SELECT s.member_count FROM servers s WHERE s.id = r.server_id), r.member_count),
                        (SELECT a.role FROM room_access a WHERE a.room_id = ?1 AND a.user_id = ?2)
                 FROM rooms r WHERE r.id = ?1",
            )
            .and_then(|mut st| {
                st.query_row(params![to_db(room), to_db(user)], |row| {
                    Ok(RoomDetailsRecord { room: room_row(row)?, members: from_db(row.get(4)?), role: row.get(5)? })
                })
                .optional()
            })
            .map_err(db_err)
    }

    fn members(&mut self, room: RoomId, after_user: UserId, limit: u32) -> Result<Vec<MemberRecord>> {
        let server: Option<i64> = self
            .conn
            .prepare_cached("SELECT server_id FROM rooms WHERE id = ?1")
            .and_then(|mut st| st.query_row([to_db(room)], |row| row.get(0)).optional())
            .map_err(db_err)?
            .flatten();
        // A channel's members are its server's (those who may read it are filtered by the
        // caller's needs elsewhere; the list shows the community).
        let sql = if server.is_some() {
            "SELECT m.user_id, u.name, m.role, 0 FROM rooms r
             JOIN server_members m ON m.server_id = r.server_id
             JOIN users u ON u.id = m.user_id
             WHERE r.id = ?1 AND m.user_id > ?2 ORDER BY m.user_id LIMIT ?3"
        } else {
            "SELECT m.user_id, u.name, m.role, m.muted FROM room_members m
             JOIN users u ON u.id = m.user_id
             WHERE m.room_id = ?1 AND m.user_id > ?2 ORDER BY m.user_id LIMIT ?3"
        };
        self.conn
            .prepare_cached(sql)
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

    fn mark_read(&mut self, room: RoomId, user: UserId, delivered: Seq, read: Seq) -> Result<UnreadRecord> {
        self.write(|conn| {
            if member_perms(conn, room, user)?.is_none() {
                return Err(if exists(conn, room)? {
                    StoreError::NotMember(room)
                } else {
                    StoreError::NotFound(format!("room {room}"))
                });
            }
            let head = log_state(conn, room)?.map_or(0, |(head, _)| head);
            let read = read.get().min(head);
            let delivered = delivered.get().max(read).min(head);
            exec(
                conn,
                "INSERT INTO read_cursors (room_id, user_id, delivered_seq, read_seq) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (room_id, user_id) DO UPDATE SET
                     delivered_seq = max(delivered_seq, excluded.delivered_seq),
                     read_seq = max(read_seq, excluded.read_seq)",
                params![to_db(room), to_db(user), to_db(delivered), to_db(read)],
            )?;
            unread_of(conn, room, user)
        })
    }

    fn unread(&mut self, user: UserId, after: RoomId, limit: u32) -> Result<Vec<UnreadRecord>> {
        // One statement for every room of the user, as on PostgreSQL: four lookups per room cost
        // a user in 10,000 rooms 40,000 statements on a worker at each login. A room whose head
        // is not past the read cursor has nothing unread and no mention after it, so only the
        // others are counted.
        self.conn
            .prepare_cached(
                "WITH mine(id, head) AS (
                     SELECT r.id, r.last_seq FROM room_members m
                     JOIN rooms r ON r.id = m.room_id WHERE m.user_id = ?1 AND m.room_id > ?2
                     UNION ALL
                     SELECT r.id, r.last_seq FROM server_members sm JOIN rooms r ON r.server_id = sm.server_id
                     WHERE sm.user_id = ?1 AND r.id > ?2 AND (r.read_roles IS NULL OR sm.role IN ('owner', 'admin')
                           OR instr(',' || r.read_roles || ',', ',' || sm.role || ',') > 0)
                 ),
                 state AS (
                     SELECT mine.id, mine.head, coalesce(c.delivered_seq, 0) AS delivered,
                            coalesce(c.read_seq, 0) AS read
                     FROM mine LEFT JOIN read_cursors c ON c.room_id = mine.id AND c.user_id = ?1
                     WHERE mine.head > coalesce(c.read_seq, 0)
                 ),
                 counted AS (
                     SELECT s.id, s.head, s.delivered, s.read,
                            (SELECT count(*) FROM (SELECT 1 FROM deltas d WHERE d.room_id = s.id AND d.seq > s.read
                                 AND d.kind IN (2, 9, 23) AND d.author_id <> ?1 LIMIT ?3)) AS unread,
                            (SELECT count(*) FROM mentions m
                             WHERE m.user_id = ?1 AND m.room_id = s.id AND m.seq > s.read) AS mentions
                     FROM state s
                 )
                 SELECT id, head, delivered, read, unread, mentions FROM counted
                 WHERE unread > 0 OR mentions > 0 ORDER BY id LIMIT ?4",
            )
            .and_then(|mut st| {
                st.query_map(params![to_db(user), to_db(after), crate::UNREAD_CAP as i64, limit], |r| {
                    Ok(UnreadRecord {
                        room: from_db(r.get::<_, i64>(0)?),
                        head: from_db(r.get::<_, i64>(1)?),
                        delivered: from_db(r.get::<_, i64>(2)?),
                        read: from_db(r.get::<_, i64>(3)?),
                        unread: from_db(r.get::<_, i64>(4)?),
                        mentions: from_db(r.get::<_, i64>(5)?),
                    })
                })?
                .collect()
            })
            .map_err(db_err)
    }

    fn mentions(&mut self, user: UserId, limit: u32) -> Result<Vec<MentionRecord>> {
        self.conn
            .prepare_cached(
                "SELECT m.room_id, m.seq, u.name, d.created_at, coalesce(s.text, d.body), s.deleted_seq,
                        coalesce(rc.read_seq, 0) >= m.seq
                 FROM mentions m
                 JOIN deltas d ON d.room_id = m.room_id AND d.seq = m.seq
                 JOIN users u ON u.id = m.author_id
                 LEFT JOIN message_state s ON s.room_id = m.room_id AND s.seq = m.seq
                 LEFT JOIN read_cursors rc ON rc.room_id = m.room_id AND rc.user_id = m.user_id
                 WHERE m.user_id = ?1
                   AND EXISTS (SELECT 1 FROM room_access a WHERE a.room_id = m.room_id AND a.user_id = ?1)
                 ORDER BY d.created_at DESC, m.seq DESC LIMIT ?2",
            )
            .and_then(|mut st| {
                st.query_map(params![to_db(user), limit], |r| {
                    let deleted = r.get::<_, Option<i64>>(5)?.is_some();
                    Ok(MentionRecord {
                        room: from_db(r.get(0)?),
                        seq: from_db(r.get(1)?),
                        author: r.get(2)?,
                        ts_ms: r.get(3)?,
                        text: if deleted { None } else { Some(r.get(4)?) },
                        read: r.get(6)?,
                    })
                })?
                .collect()
            })
            .map_err(db_err)
    }

    fn deltas_after(&mut self, room: RoomId, after: Seq, limit: u32) -> Result<Vec<DeltaRecord>> {
        self.conn
            .prepare_cached(
                "SELECT d.seq, d.kind, d.author_id, u.name, d.created_at, d.body, d.target FROM deltas d
                 JOIN users u ON u.id = d.author_id
                 WHERE d.room_id = ?1 AND d.seq > ?2 ORDER BY d.seq LIMIT ?3",
            )
            .and_then(|mut st| {
                st.query_map(params![to_db(room), to_db(after), limit], |row| delta_row(room, row))?.collect()
            })
            .map_err(db_err)
    }

    fn messages_before(&mut self, room: RoomId, user: UserId, before: Seq, limit: u32) -> Result<Vec<MessageRecord>> {
        let tx = self.conn.transaction().map_err(db_err)?;
        check_member(&tx, room, user)?;
        let before = if before == Seq::ZERO { i64::MAX } else { to_db(before) };
        let mut messages: Vec<MessageRecord> = tx
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS}
                 FROM deltas d JOIN users u ON u.id = d.author_id
                 LEFT JOIN message_state s ON s.room_id = d.room_id AND s.seq = d.seq
                 WHERE d.room_id = ?1 AND d.seq < ?2 AND d.kind IN (?3, ?4)
                 ORDER BY d.seq DESC LIMIT ?5"
            ))
            .and_then(|mut st| {
                st.query_map(
                    params![to_db(room), before, RecordKind::MESSAGE.0, RecordKind::REPLY.0, limit],
                    message_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(db_err)?;
        if let (Some(newest), Some(oldest)) = (messages.first(), messages.last()) {
            let (lo, hi) = (to_db(oldest.seq), to_db(newest.seq));
            let counts: Vec<(i64, String, i64, bool)> = tx
                .prepare_cached(&format!("{REACTIONS} AND r.seq BETWEEN ?2 AND ?3 ORDER BY r.seq, r.emoji"))
                .and_then(|mut st| st.query_map(params![to_db(room), lo, hi, to_db(user)], reaction_row)?.collect())
                .map_err(db_err)?;
            crate::actions::attach_reactions(&mut messages, counts);
        }
        tx.finish().map_err(db_err)?;
        Ok(messages)
    }

    fn deltas_page(&mut self, room: RoomId, order: Order, cursor: Seq, limit: u32) -> Result<Vec<DeltaRecord>> {
        let Some((lo, hi)) = order.range(cursor, limit) else { return Ok(Vec::new()) };
        let direction = match order {
            Order::OldestFirst => "ASC",
            Order::NewestFirst => "DESC",
        };
        // Both ends bound the scan: the page's seqs are known before it is read.
        self.conn
            .prepare_cached(&format!(
                "SELECT d.seq, d.kind, d.author_id, u.name, d.created_at, d.body, d.target FROM deltas d
                 JOIN users u ON u.id = d.author_id
                 WHERE d.room_id = ?1 AND d.seq BETWEEN ?2 AND ?3 ORDER BY d.seq {direction}"
            ))
            .and_then(|mut st| {
                st.query_map(params![to_db(room), to_db(lo), to_db(hi)], |row| delta_row(room, row))?.collect()
            })
            .map_err(db_err)
    }

    fn partitions(&mut self, room: RoomId) -> Result<Vec<PartitionRecord>> {
        self.conn
            .prepare_cached(
                "SELECT part, first_seq, last_seq, first_ts, last_ts, count FROM delta_partitions
                 WHERE room_id = ?1 ORDER BY part",
            )
            .and_then(|mut st| {
                st.query_map([to_db(room)], |row| {
                    Ok(PartitionRecord {
                        room,
                        part: from_db(row.get(0)?),
                        first_seq: from_db(row.get(1)?),
                        last_seq: from_db(row.get(2)?),
                        first_ts_ms: row.get(3)?,
                        last_ts_ms: row.get(4)?,
                        count: from_db(row.get(5)?),
                    })
                })?
                .collect()
            })
            .map_err(db_err)
    }

    fn search(
        &mut self,
        room: RoomId,
        user: UserId,
        words: &[String],
        before: Seq,
        limit: u32,
    ) -> Result<Vec<MessageRecord>> {
        let tx = self.conn.transaction().map_err(db_err)?;
        check_member(&tx, room, user)?;
        // The room's documents are the keys doc_id(room, 1 ..): those below `before` are one range.
        let Some(lo) = search::doc_id(room, Seq::ZERO) else { return Ok(Vec::new()) };
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let last = match before {
            Seq::ZERO => u64::from(u32::MAX),
            before => before.get().saturating_sub(1).min(u64::from(u32::MAX)),
        };
        let hi = lo + i64::try_from(last).unwrap_or(0);
        let mut messages: Vec<MessageRecord> = tx
            .prepare_cached(&search_sql())
            .and_then(|mut st| {
                st.query_map(params![search::fts5_query(words), lo, hi, limit, to_db(room)], message_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(db_err)?;
        // Matches lie anywhere in the room's log, so their reactions are read message by message
        // rather than over the range between them.
        let mut counts: Vec<(i64, String, i64, bool)> = Vec::new();
        for m in &messages {
            let rows: Vec<(i64, String, i64, bool)> = tx
                .prepare_cached(&format!("{REACTIONS} AND r.seq = ?2 ORDER BY r.emoji"))
                .and_then(|mut st| {
                    st.query_map(params![to_db(room), to_db(m.seq), 0, to_db(user)], reaction_row)?.collect()
                })
                .map_err(db_err)?;
            counts.extend(rows);
        }
        crate::actions::attach_reactions(&mut messages, counts);
        tx.finish().map_err(db_err)?;
        Ok(messages)
    }

    fn ping(&mut self) -> Result<()> {
        self.write(|conn| {
            // The counter makes every probe change the row: SQLite skips writing a page an update
            // leaves as it was, and such a commit would prove nothing about the WAL.
            let updated = conn
                .prepare_cached("UPDATE health SET pings = pings + 1, pinged_at = ?1 WHERE id = 1")
                .and_then(|mut st| st.execute([now_ms()]))
                .map_err(db_err)?;
            if updated != 1 {
                return Err(StoreError::Database("the health row is missing".into()));
            }
            Ok(())
        })
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.wal_checkpoint().map(drop)
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
        self.write(|conn| {
            let (actor_role, perms) = server_perms(conn, server, actor)?
                .ok_or_else(|| StoreError::NotFound(format!("you are not a member of server {server}")))?;
            let user: UserId = conn
                .prepare_cached("SELECT id FROM users WHERE name = ?1")
                .and_then(|mut st| st.query_row([target], |row| row.get::<_, i64>(0)).optional())
                .map_err(db_err)?
                .map(from_db)
                .ok_or_else(|| StoreError::NotFound(format!("user {target}")))?;
            let role = server_perms(conn, server, user)?.map(|(r, _)| r);
            let (banned, _) = server_standing(conn, server, user)?;
            let state = MemberState { role: role.clone(), muted: false, banned };
            let room = RoomId(server.get());
            let mut done = crate::ServerModerated { user, changed: false, left_channels: Vec::new() };
            if moderation::judge(room, action, (actor, &actor_role, perms), (user, target, &state), true)?
                == ModVerdict::Unchanged
            {
                return Ok(done);
            }
            let (s, u) = (to_db(server), to_db(user));
            match action {
                MemberAction::Invite => exec(
                    conn,
                    "INSERT OR IGNORE INTO server_invites (server_id, user_id, invited_by, invited_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![s, u, to_db(actor), now_ms],
                )?,
                MemberAction::Ban => {
                    if role.is_some() {
                        done.left_channels = readable_channels(conn, server, user)?.into_iter().map(|r| r.id).collect();
                    }
                    exec(conn, "DELETE FROM server_members WHERE server_id = ?1 AND user_id = ?2", params![s, u])?;
                    exec(conn, "DELETE FROM server_invites WHERE server_id = ?1 AND user_id = ?2", params![s, u])?;
                    exec(
                        conn,
                        "INSERT INTO server_bans (server_id, user_id, banned_by, banned_at) VALUES (?1, ?2, ?3, ?4)",
                        params![s, u, to_db(actor), now_ms],
                    )?
                }
                _ => exec(conn, "DELETE FROM server_bans WHERE server_id = ?1 AND user_id = ?2", params![s, u])?,
            };
            done.changed = true;
            Ok(done)
        })
    }

    fn last_seen(&mut self, users: &[UserId]) -> Result<Vec<(UserId, i64)>> {
        let tx = self.conn.transaction().map_err(db_err)?;
        let mut out = Vec::new();
        {
            let mut st =
                tx.prepare_cached("SELECT max(last_used_at) FROM sessions WHERE user_id = ?1").map_err(db_err)?;
            let mut ids: Vec<UserId> = users.to_vec();
            ids.sort_unstable();
            ids.dedup();
            for user in ids {
                let seen: Option<i64> = st.query_row([to_db(user)], |row| row.get(0)).map_err(db_err)?;
                out.extend(seen.map(|ms| (user, ms)));
            }
        }
        tx.finish().map_err(db_err)?;
        Ok(out)
    }

    fn push_targets(&mut self, room: RoomId, seq: Seq, author: UserId) -> Result<Vec<crate::PushTarget>> {
        let rows: Vec<(i64, String, i64)> = self
            .conn
            .prepare_cached(
                "SELECT m.user_id, u.name, 0 FROM mentions m
                 JOIN users u ON u.id = m.user_id
                 LEFT JOIN room_members rm ON rm.room_id = m.room_id AND rm.user_id = m.user_id
                 WHERE m.room_id = ?1 AND m.seq = ?2 AND m.user_id <> ?3
                   AND coalesce(rm.notify, 0) <> 2 AND coalesce(rm.muted, 0) = 0
                 UNION ALL
                 SELECT rm.user_id, u.name, 1 FROM rooms r
                 JOIN room_members rm ON rm.room_id = r.id
                 JOIN users u ON u.id = rm.user_id
                 WHERE r.id = ?1 AND r.kind = ?4 AND rm.user_id <> ?3 AND rm.notify <> 2 AND rm.muted = 0",
            )
            .and_then(|mut st| {
                st.query_map(params![to_db(room), to_db(seq), to_db(author), RoomKind::DIRECT.0], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect()
            })
            .map_err(db_err)?;
        Ok(crate::push_targets_from(rows))
    }

    fn create_upload(&mut self, u: &NewUpload) -> Result<UploadRecord> {
        self.write(|conn| {
            let Some((_, perms)) = member_perms(conn, u.room, u.user)? else {
                return Err(if exists(conn, u.room)? {
                    StoreError::NotMember(u.room)
                } else {
                    StoreError::NotFound(format!("room {}", u.room))
                });
            };
            if !perms.contains(Permissions::POST) {
                return Err(StoreError::Forbidden(format!("you may not post in room {}", u.room)));
            }
            let open: i64 = conn
                .prepare_cached("SELECT count(*) FROM uploads WHERE user_id = ?1")
                .and_then(|mut st| st.query_row([to_db(u.user)], |r| r.get(0)))
                .map_err(db_err)?;
            if open >= to_db(files::MAX_OPEN_UPLOADS) {
                return Err(StoreError::LimitReached(format!(
                    "{open} unfinished uploads; finish one first (at most {})",
                    files::MAX_OPEN_UPLOADS
                )));
            }
            let id: i64 = conn
                .prepare_cached(
                    "INSERT INTO uploads (user_id, room_id, name, size, media_type, sha256, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
                )
                .and_then(|mut st| {
                    st.query_row(
                        params![
                            to_db(u.user),
                            to_db(u.room),
                            u.name,
                            to_db(u.size),
                            u.media_type,
                            &u.sha256[..],
                            u.now_ms
                        ],
                        |r| r.get(0),
                    )
                })
                .map_err(db_err)?;
            Ok(UploadRecord {
                id: from_db(id),
                user: u.user,
                room: u.room,
                name: u.name.clone(),
                size: u.size,
                media_type: u.media_type.clone(),
                sha256: u.sha256,
            })
        })
    }

    fn upload(&mut self, id: u64, user: UserId) -> Result<UploadRecord> {
        self.conn
            .prepare_cached(
                "SELECT id, user_id, room_id, name, size, media_type, sha256 FROM uploads WHERE id = ?1 AND user_id = ?2",
            )
            .and_then(|mut st| {
                st.query_row(params![to_db(id), to_db(user)], |r| {
                    Ok(UploadRecord {
                        id: from_db(r.get(0)?),
                        user: from_db(r.get(1)?),
                        room: from_db(r.get(2)?),
                        name: r.get(3)?,
                        size: from_db(r.get(4)?),
                        media_type: r.get(5)?,
                        sha256: sha_of(r.get(6)?),
                    })
                })
                .optional()
            })
            .map_err(db_err)?
            .ok_or_else(|| StoreError::NotFound(format!("upload {id}")))
    }

    fn file_for(&mut self, file: u64, user: UserId) -> Result<FileRecord> {
        self.conn
            .prepare_cached(
                "SELECT f.id, f.owner_id, f.name, f.internal_name, f.uploaded_at, f.size, f.sha256, f.media_type,
                        f.room_id, f.seq
                 FROM files f
                 WHERE f.id = ?1 AND EXISTS (
                     SELECT 1 FROM file_permissions p JOIN room_access a ON a.room_id = p.room_id
                     WHERE p.file_id = f.id AND a.user_id = ?2)",
            )
            .and_then(|mut st| st.query_row(params![to_db(file), to_db(user)], file_row).optional())
            .map_err(db_err)?
            .ok_or_else(|| StoreError::NotFound(format!("file {file}")))
    }

    fn drop_content(&mut self, sha256: &[u8; 32]) -> Result<bool> {
        self.write(|conn| {
            conn.prepare_cached("DELETE FROM contents WHERE sha256 = ?1 AND refs <= 0")
                .and_then(|mut st| st.execute([&sha256[..]]))
                .map(|n| n > 0)
                .map_err(db_err)
        })
    }

    fn unreferenced_contents(&mut self, limit: u32) -> Result<Vec<[u8; 32]>> {
        self.conn
            .prepare_cached("SELECT sha256 FROM contents WHERE refs <= 0 LIMIT ?1")
            .and_then(|mut st| st.query_map([limit], |r| Ok(sha_of(r.get(0)?)))?.collect())
            .map_err(db_err)
    }
}

impl Store for SqliteStore {
    fn join_room(
        &mut self,
        room: RoomId,
        user: UserId,
        user_name: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> Result<Option<DeltaRecord>> {
        self.write(|conn| {
            let Some(kind) = kind_of(conn, room)? else {
                return Err(StoreError::NotFound(format!("room {room}")));
            };
            if is_member(conn, room, user)? {
                return Ok(None);
            }
            crate::check_not_direct(room, kind, "join")?;
            crate::check_not_channel(room, kind, "join")?;
            if kind == RoomKind::PRIVATE || kind == RoomKind::SECRET {
                return Err(StoreError::Forbidden(format!("room {room} is invite-only")));
            }
            if banned(conn, room, user)? {
                return Err(StoreError::Forbidden(format!("you are banned from room {room}")));
            }
            crate::check_room_cap(user, room_count(conn, user)?, max_rooms)?;
            add_member(conn, room, user, "member", now_ms)?;
            match membership_delta(conn, room, RecordKind::JOIN, user, user_name, now_ms)? {
                Some(delta) => Ok(Some(delta)),
                None => Err(StoreError::NotFound(format!("room {room}"))),
            }
        })
    }

    fn leave_room(&mut self, room: RoomId, user: UserId, user_name: &str, now_ms: i64) -> Result<DeltaRecord> {
        self.write(|conn| {
            if let Some(kind) = kind_of(conn, room)? {
                if is_member(conn, room, user)? {
                    crate::check_not_direct(room, kind, "leave")?;
                    crate::check_not_channel(room, kind, "leave")?;
                }
            }
            let removed = conn
                .prepare_cached("DELETE FROM room_members WHERE room_id = ?1 AND user_id = ?2")
                .and_then(|mut st| st.execute(params![to_db(room), to_db(user)]))
                .map_err(db_err)?;
            if removed == 0 {
                return Err(StoreError::NotMember(room));
            }
            membership_delta(conn, room, RecordKind::LEAVE, user, user_name, now_ms)?.ok_or(StoreError::NotMember(room))
        })
    }

    fn append_posts(&mut self, posts: &[NewPost]) -> Result<Vec<PostOutcome>> {
        if posts.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|conn| {
            let mut membership: HashMap<(RoomId, UserId), Option<Permissions>> = HashMap::new();
            let mut heads: HashMap<RoomId, u64> = HashMap::new();
            let mut logs: HashMap<RoomId, LogInfo> = HashMap::new();
            let mut probes = Vec::with_capacity(posts.len());
            for post in posts {
                let perms = match membership.get(&(post.room, post.author_id)) {
                    Some(perms) => *perms,
                    None => {
                        let perms = member_perms(conn, post.room, post.author_id)?.map(|(_, p)| p);
                        membership.insert((post.room, post.author_id), perms);
                        perms
                    }
                };
                let Some(perms) = perms else {
                    probes.push(Probe::default());
                    continue;
                };
                let member = true;
                if let Entry::Vacant(slot) = heads.entry(post.room) {
                    if let Some((head, log)) = log_state(conn, post.room)? {
                        slot.insert(head);
                        logs.insert(post.room, log);
                    }
                }
                if !perms.contains(Permissions::POST) {
                    probes.push(Probe { member, may_post: false, existing: None });
                    continue;
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
                probes.push(Probe { member, may_post: true, existing });
            }
            let plan = batch::plan(posts, &probes, &heads);
            let mut inserted = Vec::with_capacity(posts.len());
            for (outcome, post) in plan.outcomes.iter().zip(posts) {
                if let PostOutcome::Inserted(delta) = outcome {
                    let key = Some(post.idempotency_key.as_str()).filter(|k| !k.is_empty());
                    insert_delta(conn, delta, key)?;
                    if post.text.contains('@') {
                        insert_mentions(conn, delta.room, delta.seq, delta.author_id, &post.text)?;
                    }
                    // Planned deltas are only for rooms whose state was read above.
                    let kind = logs.get(&delta.room).map_or(RoomKind::GROUP, |log| log.kind);
                    index_message(conn, delta.room, delta.seq, kind, &delta.body)?;
                    inserted.push(delta);
                }
            }
            let part_size = |room: RoomId| logs.get(&room).map_or(partition::DEFAULT_PARTITION_SIZE, |l| l.part_size);
            record_partitions(conn, &partition::summarize(inserted, part_size))?;
            for (room, head) in &plan.heads {
                conn.prepare_cached("UPDATE rooms SET last_seq = ?2 WHERE id = ?1")
                    .and_then(|mut st| st.execute(params![to_db(*room), to_db(*head)]))
                    .map_err(db_err)?;
            }
            Ok(plan.outcomes)
        })
    }

    fn moderate(&mut self, m: &NewModeration) -> Result<ModerationOutcome> {
        self.write(|conn| {
            let Some(kind) = kind_of(conn, m.room)? else {
                return Err(StoreError::NotFound(format!("room {}", m.room)));
            };
            let (actor_role, perms) = member_perms(conn, m.room, m.actor)?.ok_or(StoreError::NotMember(m.room))?;
            crate::check_not_direct(m.room, kind, "moderate")?;
            crate::check_not_channel(m.room, kind, "moderate")?;
            let target: UserId = conn
                .prepare_cached("SELECT id FROM users WHERE name = ?1")
                .and_then(|mut st| st.query_row([&m.target], |row| row.get::<_, i64>(0)).optional())
                .map_err(db_err)?
                .map(from_db)
                .ok_or_else(|| StoreError::NotFound(format!("user {}", m.target)))?;
            let (room, user) = (to_db(m.room), to_db(target));
            let (role, muted): (Option<String>, bool) = conn
                .prepare_cached("SELECT role, silenced FROM room_members WHERE room_id = ?1 AND user_id = ?2")
                .and_then(|mut st| st.query_row(params![room, user], |row| Ok((row.get(0)?, row.get(1)?))).optional())
                .map_err(db_err)?
                .map_or((None, false), |(role, muted)| (Some(role), muted));
            let state = MemberState { role, muted, banned: banned(conn, m.room, target)? };
            let role_known = match &m.action {
                MemberAction::SetRole(name) => {
                    Permissions::of_builtin(name).is_some()
                        || conn
                            .prepare_cached("SELECT 1 FROM room_roles WHERE room_id = ?1 AND name = ?2")
                            .and_then(|mut st| st.exists(params![room, name]))
                            .map_err(db_err)?
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
                let head = log_state(conn, m.room)?.map_or(0, |(head, _)| head);
                return Ok(ModerationOutcome::Unchanged { head: Seq(head) });
            }
            let was_member = state.role.is_some();
            let (mut added, mut removed) = (false, false);
            match &m.action {
                MemberAction::Invite => {
                    crate::check_room_cap(target, room_count(conn, target)?, m.max_rooms)?;
                    add_member(conn, m.room, target, "member", m.now_ms)?;
                    added = true;
                }
                MemberAction::Kick => {
                    exec(conn, "DELETE FROM room_members WHERE room_id = ?1 AND user_id = ?2", params![room, user])?;
                    removed = true;
                }
                MemberAction::Ban => {
                    exec(
                        conn,
                        "INSERT INTO room_bans (room_id, user_id, banned_by, banned_at) VALUES (?1, ?2, ?3, ?4)",
                        params![room, user, to_db(m.actor), m.now_ms],
                    )?;
                    removed = was_member
                        && exec(
                            conn,
                            "DELETE FROM room_members WHERE room_id = ?1 AND user_id = ?2",
                            params![room, user],
                        )? > 0;
                }
                MemberAction::Unban => {
                    exec(conn, "DELETE FROM room_bans WHERE room_id = ?1 AND user_id = ?2", params![room, user])?;
                }
                MemberAction::Mute | MemberAction::Unmute => {
                    let on = m.action == MemberAction::Mute;
                    exec(
                        conn,
                        "UPDATE room_members SET silenced = ?3 WHERE room_id = ?1 AND user_id = ?2",
                        params![room, user, on],
                    )?;
                }
                MemberAction::SetRole(new) => {
                    exec(
                        conn,
                        "UPDATE room_members SET role = ?3 WHERE room_id = ?1 AND user_id = ?2",
                        params![room, user, new],
                    )?;
                }
            }
            let (seq, log) = next_seq(conn, m.room)?.ok_or_else(|| StoreError::NotFound(format!("room {}", m.room)))?;
            let body = match &m.action {
                MemberAction::SetRole(new) => new.clone(),
                _ => m.target.clone(),
            };
            let delta = DeltaRecord {
                room: m.room,
                seq: Seq(seq),
                kind: m.action.kind(),
                author_id: m.actor,
                author: m.actor_name.clone(),
                ts_ms: m.now_ms,
                body,
                target: Some(Seq(target.get())),
            };
            append_delta(conn, &delta, None, log.part_size)?;
            Ok(ModerationOutcome::Applied { delta, user: target, added, removed })
        })
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
        self.write(|conn| {
            let Some((_, perms)) = member_perms(conn, room, actor.0)? else {
                return Err(if exists(conn, room)? {
                    StoreError::NotMember(room)
                } else {
                    StoreError::NotFound(format!("room {room}"))
                });
            };
            if !perms.contains(Permissions::POST) {
                return Err(StoreError::Forbidden(format!("you may not post in room {room}")));
            }
            let target = if kind == RecordKind::CALL_INVITE {
                None
            } else {
                let invite: Option<u8> = conn
                    .prepare_cached("SELECT kind FROM deltas WHERE room_id = ?1 AND seq = ?2")
                    .and_then(|mut st| st.query_row(params![to_db(room), to_db(call)], |r| r.get(0)).optional())
                    .map_err(db_err)?;
                if invite != Some(RecordKind::CALL_INVITE.0) {
                    return Err(StoreError::NotFound(format!("no call {call} in room {room}")));
                }
                Some(call)
            };
            let (seq, log) = next_seq(conn, room)?.ok_or_else(|| StoreError::NotFound(format!("room {room}")))?;
            let delta = DeltaRecord {
                room,
                seq: Seq(seq),
                kind,
                author_id: actor.0,
                author: actor.1.into(),
                ts_ms: now_ms,
                body: data.into(),
                target,
            };
            append_delta(conn, &delta, None, log.part_size)?;
            Ok(delta)
        })
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
        self.write(|conn| {
            let Some(kind) = kind_of(conn, room)? else {
                return Err(StoreError::NotFound(format!("room {room}")));
            };
            let (_, mine) = member_perms(conn, room, actor)?.ok_or(StoreError::NotMember(room))?;
            crate::check_not_direct(room, kind, "define roles in")?;
            crate::check_not_channel(room, kind, "define roles in")?;
            moderation::check_define(room, name, mine)?;
            match perms {
                Some(p) => exec(
                    conn,
                    "INSERT INTO room_roles (room_id, name, perms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (room_id, name) DO UPDATE SET perms = excluded.perms",
                    params![to_db(room), name, i64::from(p.0)],
                )?,
                None => {
                    exec(conn, "DELETE FROM room_roles WHERE room_id = ?1 AND name = ?2", params![to_db(room), name])?
                }
            };
            let (seq, log) = next_seq(conn, room)?.ok_or_else(|| StoreError::NotFound(format!("room {room}")))?;
            let delta = DeltaRecord {
                room,
                seq: Seq(seq),
                kind: RecordKind::ROLE_DEFINED,
                author_id: actor,
                author: actor_name.into(),
                ts_ms: now_ms,
                body: moderation::role_body(name, perms),
                target: None,
            };
            append_delta(conn, &delta, None, log.part_size)?;
            Ok(delta)
        })
    }

    fn act(&mut self, a: &NewAction) -> Result<ActionOutcome> {
        self.write(|conn| {
            let Some((_, perms)) = member_perms(conn, a.room, a.actor)? else {
                return Err(if exists(conn, a.room)? {
                    StoreError::NotMember(a.room)
                } else {
                    StoreError::NotFound(format!("room {}", a.room))
                });
            };
            if !a.idempotency_key.is_empty() {
                let earlier = conn
                    .prepare_cached(
                        "SELECT seq, created_at FROM deltas WHERE room_id = ?1 AND author_id = ?2 AND idempotency_key = ?3",
                    )
                    .and_then(|mut st| {
                        st.query_row(params![to_db(a.room), to_db(a.actor), a.idempotency_key], |row| {
                            Ok((from_db(row.get(0)?), row.get(1)?))
                        })
                        .optional()
                    })
                    .map_err(db_err)?;
                if let Some((seq, ts_ms)) = earlier {
                    return Ok(ActionOutcome::Unchanged { seq, ts_ms });
                }
            }
            let target = action_target(conn, a)?;
            match actions::judge(a.room, a.target, &a.action, a.actor, perms, target.as_ref())? {
                Verdict::AlreadyDone(seq) => Ok(ActionOutcome::Unchanged { seq, ts_ms: delta_time(conn, a.room, seq)? }),
                Verdict::Write => {
                    let (seq, log) =
                        next_seq(conn, a.room)?.ok_or_else(|| StoreError::NotFound(format!("room {}", a.room)))?;
                    let delta = DeltaRecord {
                        room: a.room,
                        seq: Seq(seq),
                        kind: a.action.kind(),
                        author_id: a.actor,
                        author: a.actor_name.clone(),
                        ts_ms: a.now_ms,
                        body: a.action.body().to_string(),
                        target: Some(a.target),
                    };
                    let key = Some(a.idempotency_key.as_str()).filter(|k| !k.is_empty());
                    append_delta(conn, &delta, key, log.part_size)?;
                    apply_action(conn, a, delta.seq)?;
                    if a.action == MessageAction::Delete && target.as_ref().is_some_and(|t| t.kind == RecordKind::FILE_SHARED) {
                        unshare_file(conn, a.room, a.target)?;
                    }
                    if let MessageAction::Reply { text } = &a.action {
                        insert_mentions(conn, a.room, delta.seq, a.actor, text)?;
                    }
                    index_action(conn, a, delta.seq, log.kind)?;
                    Ok(ActionOutcome::Applied(delta))
                }
            }
        })
    }

    fn share_file(&mut self, f: &NewFile) -> Result<(FileRecord, DeltaRecord)> {
        self.write(|conn| {
            let Some((_, perms)) = member_perms(conn, f.room, f.actor.0)? else {
                return Err(if exists(conn, f.room)? {
                    StoreError::NotMember(f.room)
                } else {
                    StoreError::NotFound(format!("room {}", f.room))
                });
            };
            if !perms.contains(Permissions::POST) {
                return Err(StoreError::Forbidden(format!("you may not post in room {}", f.room)));
            }
            let removed = conn
                .prepare_cached("DELETE FROM uploads WHERE id = ?1 AND user_id = ?2")
                .and_then(|mut st| st.execute(params![to_db(f.upload), to_db(f.actor.0)]))
                .map_err(db_err)?;
            if removed == 0 {
                return Err(StoreError::NotFound(format!("upload {}", f.upload)));
            }
            add_content_ref(conn, &f.sha256, f.size, f.now_ms)?;
            let (seq, log) = next_seq(conn, f.room)?.ok_or_else(|| StoreError::NotFound(format!("room {}", f.room)))?;
            let file = FileRecord {
                id: 0,
                owner: f.actor.0,
                name: f.name.clone(),
                internal_name: hex_of(&f.sha256),
                uploaded_ms: f.now_ms,
                size: f.size,
                sha256: f.sha256,
                media_type: f.media_type.clone(),
                shared_in: (f.room, Seq(seq)),
            };
            let file = insert_file(conn, file)?;
            let delta = DeltaRecord {
                room: f.room,
                seq: Seq(seq),
                kind: RecordKind::FILE_SHARED,
                author_id: f.actor.0,
                author: f.actor.1.clone(),
                ts_ms: f.now_ms,
                body: files::encode_body(&f.sha256, f.size, &f.media_type, &f.name, &f.caption),
                target: Some(Seq(file.id)),
            };
            append_delta(conn, &delta, None, log.part_size)?;
            Ok((file, delta))
        })
    }

    fn forward(
        &mut self,
        actor: (UserId, &str),
        room: RoomId,
        seq: Seq,
        to_room: RoomId,
        now_ms: i64,
    ) -> Result<DeltaRecord> {
        self.write(|conn| {
            if !is_member(conn, room, actor.0)? {
                return Err(if exists(conn, room)? {
                    StoreError::NotMember(room)
                } else {
                    StoreError::NotFound(format!("room {room}"))
                });
            }
            let Some((_, perms)) = member_perms(conn, to_room, actor.0)? else {
                return Err(if exists(conn, to_room)? {
                    StoreError::NotMember(to_room)
                } else {
                    StoreError::NotFound(format!("room {to_room}"))
                });
            };
            if !perms.contains(Permissions::POST) {
                return Err(StoreError::Forbidden(format!("you may not post in room {to_room}")));
            }
            let no_message = || StoreError::NotFound(format!("no message {seq} in room {room}"));
            let source: Option<ForwardSource> = conn
                .prepare_cached(
                    "SELECT d.kind, d.body, d.target, s.text, s.deleted_seq FROM deltas d
                     LEFT JOIN message_state s ON s.room_id = d.room_id AND s.seq = d.seq
                     WHERE d.room_id = ?1 AND d.seq = ?2",
                )
                .and_then(|mut st| {
                    st.query_row(params![to_db(room), to_db(seq)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()
                })
                .map_err(db_err)?;
            let (kind, body, target, edited, deleted) = source.ok_or_else(no_message)?;
            if deleted.is_some() {
                return Err(no_message());
            }
            let kind = RecordKind(kind);
            let (new_seq, log) =
                next_seq(conn, to_room)?.ok_or_else(|| StoreError::NotFound(format!("room {to_room}")))?;
            let (kind, body, target) = match kind {
                RecordKind::MESSAGE | RecordKind::REPLY => (RecordKind::MESSAGE, edited.unwrap_or(body), None),
                RecordKind::FILE_SHARED => {
                    let id: i64 = target.ok_or_else(no_message)?;
                    let original = conn
                        .prepare_cached(
                            "SELECT id, owner_id, name, internal_name, uploaded_at, size, sha256, media_type, room_id, seq
                             FROM files WHERE id = ?1",
                        )
                        .and_then(|mut st| st.query_row([id], file_row).optional())
                        .map_err(db_err)?
                        .ok_or_else(no_message)?;
                    add_content_ref(conn, &original.sha256, original.size, now_ms)?;
                    let copy = FileRecord {
                        id: 0,
                        owner: actor.0,
                        uploaded_ms: now_ms,
                        shared_in: (to_room, Seq(new_seq)),
                        ..original
                    };
                    let copy = insert_file(conn, copy)?;
                    (RecordKind::FILE_SHARED, body, Some(Seq(copy.id)))
                }
                _ => return Err(StoreError::NotFound(format!("delta {seq} in room {room} is not a message"))),
            };
            let delta = DeltaRecord {
                room: to_room,
                seq: Seq(new_seq),
                kind,
                author_id: actor.0,
                author: actor.1.into(),
                ts_ms: now_ms,
                body,
                target,
            };
            append_delta(conn, &delta, None, log.part_size)?;
            if kind == RecordKind::MESSAGE {
                index_message(conn, to_room, delta.seq, log.kind, &delta.body)?;
            }
            Ok(delta)
        })
    }
}

/// A message to forward as its row reads: kind, body, target, latest text, deleted seq.
type ForwardSource = (u8, String, Option<i64>, Option<String>, Option<i64>);

/// A hash read back from a BLOB column (a wrong length reads as zeros: never written so).
fn sha_of(v: Vec<u8>) -> [u8; 32] {
    <[u8; 32]>::try_from(v.as_slice()).unwrap_or([0; 32])
}

fn hex_of(sha: &[u8; 32]) -> String {
    sha.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_row(r: &Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: from_db(r.get(0)?),
        owner: from_db(r.get(1)?),
        name: r.get(2)?,
        internal_name: r.get(3)?,
        uploaded_ms: r.get(4)?,
        size: from_db(r.get(5)?),
        sha256: sha_of(r.get(6)?),
        media_type: r.get(7)?,
        shared_in: (from_db(r.get(8)?), from_db(r.get(9)?)),
    })
}

/// One more file record points at content `sha` (its row created at one reference).
fn add_content_ref(conn: &Connection, sha: &[u8; 32], size: u64, now_ms: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO contents (sha256, size, refs, created_at) VALUES (?1, ?2, 1, ?3)
         ON CONFLICT (sha256) DO UPDATE SET refs = refs + 1",
    )
    .and_then(|mut st| st.execute(params![&sha[..], to_db(size), now_ms]))
    .map(drop)
    .map_err(db_err)
}

/// Inserts a file record and its permission for the room it is shared in; returns it with its id.
fn insert_file(conn: &Connection, mut f: FileRecord) -> Result<FileRecord> {
    let id: i64 = conn
        .prepare_cached(
            "INSERT INTO files (owner_id, name, internal_name, uploaded_at, size, sha256, media_type, room_id, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
        )
        .and_then(|mut st| {
            st.query_row(
                params![
                    to_db(f.owner),
                    f.name,
                    f.internal_name,
                    f.uploaded_ms,
                    to_db(f.size),
                    &f.sha256[..],
                    f.media_type,
                    to_db(f.shared_in.0),
                    to_db(f.shared_in.1)
                ],
                |r| r.get(0),
            )
        })
        .map_err(db_err)?;
    conn.prepare_cached("INSERT INTO file_permissions (file_id, room_id) VALUES (?1, ?2)")
        .and_then(|mut st| st.execute(params![id, to_db(f.shared_in.0)]))
        .map_err(db_err)?;
    f.id = from_db(id);
    Ok(f)
}

/// The `FILE_SHARED` delta (room, seq) was deleted: its file record and permissions go, and its
/// content counts one reference less (collected by the daemon at zero).
fn unshare_file(conn: &Connection, room: RoomId, seq: Seq) -> Result<()> {
    let sha: Option<Vec<u8>> = conn
        .prepare_cached("DELETE FROM files WHERE room_id = ?1 AND seq = ?2 RETURNING sha256")
        .and_then(|mut st| st.query_row(params![to_db(room), to_db(seq)], |r| r.get(0)).optional())
        .map_err(db_err)?;
    if let Some(sha) = sha {
        conn.prepare_cached("UPDATE contents SET refs = refs - 1 WHERE sha256 = ?1")
            .and_then(|mut st| st.execute([sha]))
            .map_err(db_err)?;
    }
    Ok(())
}

/// The target of an action, read in the action's transaction.
fn action_target(conn: &Connection, a: &NewAction) -> Result<Option<Target>> {
    let emoji = match &a.action {
        MessageAction::React { emoji } | MessageAction::Unreact { emoji } => Some(emoji.as_str()),
        _ => None,
    };
    conn.prepare_cached(
        "SELECT d.kind, d.author_id, s.deleted_seq, s.pinned_seq,
                (SELECT ru.delta_seq FROM reaction_users ru WHERE ru.room_id = d.room_id AND ru.seq = d.seq
                    AND ru.emoji = ?3 AND ru.user_id = ?4)
         FROM deltas d LEFT JOIN message_state s ON s.room_id = d.room_id AND s.seq = d.seq
         WHERE d.room_id = ?1 AND d.seq = ?2",
    )
    .and_then(|mut st| {
        st.query_row(params![to_db(a.room), to_db(a.target), emoji, to_db(a.actor)], |row| {
            Ok(Target {
                kind: RecordKind(row.get(0)?),
                author: from_db(row.get(1)?),
                deleted: row.get::<_, Option<i64>>(2)?.map(from_db),
                pinned: row.get::<_, Option<i64>>(3)?.map(from_db),
                reaction: row.get::<_, Option<i64>>(4)?.map(from_db),
            })
        })
        .optional()
    })
    .map_err(db_err)
}

/// The member's role and permissions in the room (its own member, or for a channel a member of
/// its server who may read it), `None` when neither.
fn member_perms(conn: &Connection, room: RoomId, user: UserId) -> Result<Option<(String, Permissions)>> {
    conn.prepare_cached(
        "SELECT role, silenced, defined, post_roles FROM room_access WHERE room_id = ?1 AND user_id = ?2",
    )
    .and_then(|mut st| {
        st.query_row(params![to_db(room), to_db(user)], |row| {
            let role: String = row.get(0)?;
            let defined = row.get::<_, Option<i64>>(2)?.map(|p| Permissions(u32::try_from(p).unwrap_or(0)));
            let perms = moderation::effective(&role, defined, row.get(1)?);
            let post_roles: Option<String> = row.get(3)?;
            let perms = crate::channel_perms(&role, perms, post_roles.as_deref());
            Ok((role, perms))
        })
        .optional()
    })
    .map_err(db_err)
}

/// The user's role and permissions in a server, `None` when not a member.
/// Whether a user is banned from a server, and whether they hold an invitation to it.
fn server_standing(conn: &Connection, server: ServerId, user: UserId) -> Result<(bool, bool)> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM server_bans WHERE server_id = ?1 AND user_id = ?2),
                EXISTS (SELECT 1 FROM server_invites WHERE server_id = ?1 AND user_id = ?2)",
    )
    .and_then(|mut st| st.query_row(params![to_db(server), to_db(user)], |row| Ok((row.get(0)?, row.get(1)?))))
    .map_err(db_err)
}

fn server_perms(conn: &Connection, server: ServerId, user: UserId) -> Result<Option<(String, Permissions)>> {
    conn.prepare_cached(
        "SELECT m.role, m.silenced, r.perms FROM server_members m
         LEFT JOIN server_roles r ON r.server_id = m.server_id AND r.name = m.role
         WHERE m.server_id = ?1 AND m.user_id = ?2",
    )
    .and_then(|mut st| {
        st.query_row(params![to_db(server), to_db(user)], |row| {
            let role: String = row.get(0)?;
            let defined = row.get::<_, Option<i64>>(2)?.map(|p| Permissions(u32::try_from(p).unwrap_or(0)));
            Ok((role.clone(), moderation::effective(&role, defined, row.get(1)?)))
        })
        .optional()
    })
    .map_err(db_err)
}

const SERVER_COLUMNS: &str = "s.id, s.name, s.description, s.public, s.owner_id, s.member_count, s.member_cap, m.role";

fn server_row(row: &Row<'_>) -> rusqlite::Result<ServerRecord> {
    Ok(ServerRecord {
        id: from_db(row.get(0)?),
        name: row.get(1)?,
        description: row.get(2)?,
        public: row.get(3)?,
        owner: from_db(row.get(4)?),
        members: from_db(row.get(5)?),
        member_cap: from_db(row.get(6)?),
        role: row.get(7)?,
    })
}

fn server_of(conn: &Connection, server: ServerId, user: UserId) -> Result<Option<ServerRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {SERVER_COLUMNS} FROM servers s
         LEFT JOIN server_members m ON m.server_id = s.id AND m.user_id = ?2 WHERE s.id = ?1"
    ))
    .and_then(|mut st| st.query_row(params![to_db(server), to_db(user)], server_row).optional())
    .map_err(db_err)
}

/// How many servers a user is in.
fn server_count(conn: &Connection, user: UserId) -> Result<u64> {
    conn.prepare_cached("SELECT count(*) FROM server_members WHERE user_id = ?1")
        .and_then(|mut st| st.query_row([to_db(user)], |row| row.get::<_, i64>(0)))
        .map(from_db)
        .map_err(db_err)
}

/// The channels of a server the user may read.
fn readable_channels(conn: &Connection, server: ServerId, user: UserId) -> Result<Vec<RoomRecord>> {
    conn.prepare_cached(
        "SELECT r.id, r.name, r.kind, r.last_seq FROM rooms r
         JOIN server_members sm ON sm.server_id = r.server_id AND sm.user_id = ?2
         WHERE r.server_id = ?1 AND (r.read_roles IS NULL OR sm.role IN ('owner', 'admin')
               OR instr(',' || r.read_roles || ',', ',' || sm.role || ',') > 0)
         ORDER BY r.id",
    )
    .and_then(|mut st| st.query_map(params![to_db(server), to_db(user)], room_row)?.collect())
    .map_err(db_err)
}

/// Inserts a room (a group, a dialog, a channel) with its `CREATE` delta as seq 1.
fn insert_room(
    conn: &Connection,
    name: &str,
    kind: RoomKind,
    (owner, owner_name): (UserId, &str),
    now_ms: i64,
    server: Option<(ServerId, Option<String>, Option<String>)>,
    part_size: u64,
) -> Result<(RoomRecord, DeltaRecord)> {
    let (server_id, read_roles, post_roles) = match server {
        Some((s, r, p)) => (Some(to_db(s)), r, p),
        None => (None, None, None),
    };
    let id: i64 = conn
        .prepare_cached(
            "INSERT INTO rooms (name, kind, last_seq, created_by, created_at, server_id, read_roles, post_roles,
                                part_size)
             VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
        )
        .and_then(|mut st| {
            st.query_row(
                params![name, kind.0, to_db(owner), now_ms, server_id, read_roles, post_roles, to_db(part_size)],
                |row| row.get(0),
            )
        })
        .map_err(db_err)?;
    let (room, delta) = crate::created_room(from_db(id), name, kind, owner, owner_name, now_ms);
    append_delta(conn, &delta, None, part_size)?;
    Ok((room, delta))
}

/// The time of a room's delta (for answers about an earlier delta).
fn delta_time(conn: &Connection, room: RoomId, seq: Seq) -> Result<i64> {
    conn.prepare_cached("SELECT created_at FROM deltas WHERE room_id = ?1 AND seq = ?2")
        .and_then(|mut st| st.query_row(params![to_db(room), to_db(seq)], |row| row.get(0)))
        .map_err(db_err)
}

/// Keeps the search index in step with a written action: a reply is indexed, an edit replaces
/// its message's words, a delete removes them.
fn index_action(conn: &Connection, a: &NewAction, seq: Seq, kind: RoomKind) -> Result<()> {
    match &a.action {
        MessageAction::Reply { text } => index_message(conn, a.room, seq, kind, text),
        MessageAction::Edit { text } => {
            unindex_message(conn, a.room, a.target)?;
            index_message(conn, a.room, a.target, kind, text)
        }
        MessageAction::Delete => unindex_message(conn, a.room, a.target),
        _ => Ok(()),
    }
}

/// Applies a written action to its message's state.
fn apply_action(conn: &Connection, a: &NewAction, seq: Seq) -> Result<()> {
    let (room, target) = (to_db(a.room), to_db(a.target));
    let run = |sql: &str, p: &[&dyn rusqlite::ToSql]| {
        conn.prepare_cached(sql).and_then(|mut st| st.execute(p)).map(drop).map_err(db_err)
    };
    match &a.action {
        MessageAction::Edit { text } => run(
            "INSERT INTO message_state (room_id, seq, text, edited_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (room_id, seq) DO UPDATE SET text = excluded.text, edited_at = excluded.edited_at",
            params![room, target, text, a.now_ms],
        ),
        MessageAction::Delete => run(
            "INSERT INTO message_state (room_id, seq, deleted_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (room_id, seq) DO UPDATE SET deleted_seq = excluded.deleted_seq, text = NULL",
            params![room, target, to_db(seq)],
        ),
        MessageAction::Pin => run(
            "INSERT INTO message_state (room_id, seq, pinned_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (room_id, seq) DO UPDATE SET pinned_seq = excluded.pinned_seq",
            params![room, target, to_db(seq)],
        ),
        MessageAction::Unpin => {
            run("UPDATE message_state SET pinned_seq = NULL WHERE room_id = ?1 AND seq = ?2", params![room, target])
        }
        MessageAction::React { emoji } => {
            run(
                "INSERT INTO reaction_users (room_id, seq, emoji, user_id, delta_seq) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![room, target, emoji, to_db(a.actor), to_db(seq)],
            )?;
            run(
                "INSERT INTO reactions (room_id, seq, emoji, count) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (room_id, seq, emoji) DO UPDATE SET count = count + 1",
                params![room, target, emoji],
            )
        }
        MessageAction::Unreact { emoji } => {
            run(
                "DELETE FROM reaction_users WHERE room_id = ?1 AND seq = ?2 AND emoji = ?3 AND user_id = ?4",
                params![room, target, emoji, to_db(a.actor)],
            )?;
            // A count reaching zero leaves no row rather than a zero.
            run(
                "DELETE FROM reactions WHERE room_id = ?1 AND seq = ?2 AND emoji = ?3 AND count = 1",
                params![room, target, emoji],
            )?;
            run(
                "UPDATE reactions SET count = count - 1 WHERE room_id = ?1 AND seq = ?2 AND emoji = ?3",
                params![room, target, emoji],
            )
        }
        MessageAction::Reply { .. } => Ok(()),
    }
}

fn is_member(conn: &Connection, room: RoomId, user: UserId) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM room_access WHERE room_id = ?1 AND user_id = ?2")
        .and_then(|mut st| st.exists(params![to_db(room), to_db(user)]))
        .map_err(db_err)
}

/// Records a use of a session that is not revoked, never moving its last use back; its last use
/// afterwards, or `None` when there is no such session.
fn touch(conn: &Connection, session: SessionId, now_ms: i64) -> Result<Option<i64>> {
    conn.prepare_cached(
        "UPDATE sessions SET last_used_at = max(last_used_at, ?2)
         WHERE id = ?1 AND revoked_at IS NULL RETURNING last_used_at",
    )
    .and_then(|mut st| st.query_row(params![to_db(session), now_ms], |row| row.get(0)).optional())
    .map_err(db_err)
}

/// How many rooms a user is a member of.
fn room_count(conn: &Connection, user: UserId) -> Result<u64> {
    conn.prepare_cached("SELECT count(*) FROM room_members WHERE user_id = ?1")
        .and_then(|mut st| st.query_row([to_db(user)], |row| row.get::<_, i64>(0)))
        .map(from_db)
        .map_err(db_err)
}

fn add_member(conn: &Connection, room: RoomId, user: UserId, role: &str, now_ms: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO room_members (room_id, user_id, role, muted, joined_at) VALUES (?1, ?2, ?3, 0, ?4)",
    )
    .and_then(|mut st| st.execute(params![to_db(room), to_db(user), role, now_ms]))
    .map(drop)
    .map_err(db_err)
}

/// Records the mentions in a new message (`@name` of a user who may read the room, not the
/// author): one statement per name, and nothing for a text without `@`.
fn insert_mentions(conn: &Connection, room: RoomId, seq: Seq, author: UserId, text: &str) -> Result<()> {
    for name in crate::mentioned_names(text) {
        exec(
            conn,
            "INSERT OR IGNORE INTO mentions (user_id, room_id, seq, author_id)
             SELECT u.id, ?2, ?3, ?4 FROM users u
             WHERE u.name = ?1 AND u.id <> ?4
               AND EXISTS (SELECT 1 FROM room_access a WHERE a.room_id = ?2 AND a.user_id = u.id)",
            params![name, to_db(room), to_db(seq), to_db(author)],
        )?;
    }
    Ok(())
}

/// A room's unread state for a user, from their cursors.
fn unread_of(conn: &Connection, room: RoomId, user: UserId) -> Result<UnreadRecord> {
    let head = log_state(conn, room)?.map_or(0, |(head, _)| head);
    let (delivered, read): (i64, i64) = conn
        .prepare_cached("SELECT delivered_seq, read_seq FROM read_cursors WHERE room_id = ?1 AND user_id = ?2")
        .and_then(|mut st| st.query_row(params![to_db(room), to_db(user)], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(db_err)?
        .unwrap_or((0, 0));
    let unread: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM (SELECT 1 FROM deltas WHERE room_id = ?1 AND seq > ?2 AND kind IN (2, 9, 23)
             AND author_id <> ?3 LIMIT ?4)",
        )
        .and_then(|mut st| {
            st.query_row(params![to_db(room), read, to_db(user), crate::UNREAD_CAP as i64], |r| r.get(0))
        })
        .map_err(db_err)?;
    let mentions: i64 = conn
        .prepare_cached("SELECT count(*) FROM mentions WHERE user_id = ?1 AND room_id = ?2 AND seq > ?3")
        .and_then(|mut st| st.query_row(params![to_db(user), to_db(room), read], |r| r.get(0)))
        .map_err(db_err)?;
    Ok(UnreadRecord {
        room,
        head: Seq(head),
        delivered: from_db(delivered),
        read: from_db(read),
        unread: from_db(unread),
        mentions: from_db(mentions),
    })
}

/// Whether the user is banned from the room.
fn banned(conn: &Connection, room: RoomId, user: UserId) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM room_bans WHERE room_id = ?1 AND user_id = ?2")
        .and_then(|mut st| st.exists(params![to_db(room), to_db(user)]))
        .map_err(db_err)
}

/// Runs one statement of a write.
fn exec(conn: &Connection, sql: &str, p: &[&dyn rusqlite::ToSql]) -> Result<usize> {
    conn.prepare_cached(sql).and_then(|mut st| st.execute(p)).map_err(db_err)
}

/// A room's kind, `None` when there is no such room.
fn kind_of(conn: &Connection, room: RoomId) -> Result<Option<RoomKind>> {
    conn.prepare_cached("SELECT kind FROM rooms WHERE id = ?1")
        .and_then(|mut st| st.query_row([to_db(room)], |row| row.get::<_, u8>(0)).optional())
        .map(|k| k.map(RoomKind))
        .map_err(db_err)
}

fn exists(conn: &Connection, room: RoomId) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM rooms WHERE id = ?1").and_then(|mut st| st.exists([to_db(room)])).map_err(db_err)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn pragma(conn: &Connection, name: &str) -> String {
        conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get::<_, rusqlite::types::Value>(0))
            .map(|v| format!("{v:?}"))
            .expect("pragma")
    }

    /// A short busy timeout, so a test of a held lock waits 200 ms rather than 5 s.
    fn impatient() -> OpenOptions {
        OpenOptions { busy_timeout: Duration::from_millis(200), ..OpenOptions::default() }
    }

    fn message(room: RoomId, author: &UserRecord, key: &str, text: String) -> NewPost {
        NewPost {
            room,
            author_id: author.id,
            author: author.name.clone(),
            idempotency_key: key.into(),
            text,
            now_ms: 1,
        }
    }

    /// How many frames the WAL file has room for: its high-water mark, read from the file
    /// itself so that looking does not checkpoint.
    fn wal_frames(path: &Path, page_size: u64) -> u64 {
        let mut wal = OsString::from(path.as_os_str());
        wal.push("-wal");
        let len = std::fs::metadata(PathBuf::from(wal)).map_or(0, |m| m.len());
        // A 32-byte file header, then frames of a 24-byte header and one page.
        len.saturating_sub(32) / (24 + page_size)
    }

    #[test]
    fn a_search_reads_its_page_of_matches_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("chime.db")).expect("open");
        let plan: Vec<String> = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", search_sql()))
            .and_then(|mut st| st.query_map(params!["\"x\"", 1, 2, 50, 1], |row| row.get(3))?.collect())
            .expect("plan");
        let at = |step: &str| plan.iter().position(|p| p.starts_with(step)).unwrap_or_else(|| panic!("{plan:?}"));
        assert!(at("SCAN f") < at("SEARCH d USING PRIMARY KEY (room_id=? AND seq=?)"), "{plan:?}");
    }

    #[test]
    fn errors_are_classified_by_their_primary_code() {
        let class =
            |code: std::ffi::c_int| match sqlite_error(&rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)) {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::Conflict(_) => "conflict",
                StoreError::NotFound(_) => "not found",
                StoreError::Database(_) => "database",
                other => panic!("{other:?}"),
            };
        for code in [
            ffi::SQLITE_FULL,
            ffi::SQLITE_BUSY,
            ffi::SQLITE_BUSY_SNAPSHOT,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_LOCKED_SHAREDCACHE,
            ffi::SQLITE_READONLY,
            ffi::SQLITE_READONLY_DBMOVED,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_IOERR_SHORT_READ,
            ffi::SQLITE_CANTOPEN,
            ffi::SQLITE_CANTOPEN_ISDIR,
            ffi::SQLITE_PROTOCOL,
            ffi::SQLITE_NOMEM,
        ] {
            assert_eq!(class(code), "unavailable", "code {code}");
        }
        assert_eq!(class(ffi::SQLITE_CONSTRAINT_UNIQUE), "conflict");
        assert_eq!(class(ffi::SQLITE_CONSTRAINT_PRIMARYKEY), "conflict");
        assert_eq!(class(ffi::SQLITE_CONSTRAINT_FOREIGNKEY), "not found");
        for code in [ffi::SQLITE_CONSTRAINT_CHECK, ffi::SQLITE_CORRUPT, ffi::SQLITE_NOTADB, ffi::SQLITE_ERROR] {
            assert_eq!(class(code), "database", "code {code}");
        }
    }

    #[test]
    fn open_creates_the_directory_and_sets_durable_pragmas() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nested/deeper/chime.db");
        let store = SqliteStore::open(&path).expect("open");
        assert!(path.exists());
        assert_eq!(pragma(&store.conn, "journal_mode"), r#"Text("wal")"#);
        // 2 is FULL.
        assert_eq!(pragma(&store.conn, "synchronous"), "Integer(2)");
        assert_eq!(pragma(&store.conn, "foreign_keys"), "Integer(1)");
        assert_eq!(pragma(&store.conn, "busy_timeout"), "Integer(5000)");
        assert_eq!(pragma(&store.conn, "journal_size_limit"), format!("Integer({JOURNAL_SIZE_LIMIT})"));
        // SQLite's own default: automatic checkpoints stay on unless asked otherwise.
        assert_eq!(pragma(&store.conn, "wal_autocheckpoint"), "Integer(1000)");
    }

    #[test]
    fn options_set_the_busy_timeout_and_turn_automatic_checkpoints_off() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = OpenOptions { manual_checkpoints: true, ..impatient() };
        let store = SqliteStore::open_with(dir.path().join("chime.db"), &options).expect("open");
        assert_eq!(pragma(&store.conn, "busy_timeout"), "Integer(200)");
        assert_eq!(pragma(&store.conn, "wal_autocheckpoint"), "Integer(0)");
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
        for path in [file.join("chime.db"), file.join("deeper/chime.db"), dir.path().to_path_buf()] {
            let err = SqliteStore::open(&path).err().expect("must fail");
            assert!(matches!(err, StoreError::Config(_)), "{}: {err:?}", path.display());
        }
    }

    /// Set by [`files_are_private_even_under_a_permissive_umask`] in the copy of this test binary
    /// it runs under `umask 000`, to a directory to work in.
    const UMASK_CHILD_ENV: &str = "CHIME_STORAGE_UMASK_CHILD";

    /// The umask is per process, so the check runs in a copy of this test binary started by a
    /// shell that set it: changing it here would race the other tests' files.
    #[cfg(unix)]
    #[test]
    fn files_are_private_even_under_a_permissive_umask() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path| std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777;
        if let Some(dir) = std::env::var_os(UMASK_CHILD_ENV) {
            let dir = PathBuf::from(dir);
            let probe = dir.join("probe");
            std::fs::write(&probe, b"").expect("probe");
            assert_eq!(mode(&probe), 0o666, "the umask is not permissive, so this test proves nothing");
            let path = dir.join("chime.db");
            let mut store = SqliteStore::open(&path).expect("open");
            store.create_user("ada", "hash").expect("a write, so the WAL and its index exist");
            for suffix in ["", "-wal", "-shm"] {
                let file = PathBuf::from(format!("{}{suffix}", path.display()));
                assert_eq!(mode(&file), 0o600, "{}", file.display());
            }
            assert!(shared_files(&path).is_empty());
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let test = "sqlite::tests::files_are_private_even_under_a_permissive_umask";
        let output = std::process::Command::new("sh")
            .args(["-c", r#"umask 000 && exec "$0" "$@""#])
            .arg(std::env::current_exe().expect("test binary"))
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(UMASK_CHILD_ENV, dir.path())
            .output()
            .expect("run the test under umask 000");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[cfg(unix)]
    #[test]
    fn files_open_to_other_users_are_found() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chime.db");
        std::fs::write(&path, b"").expect("create");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        // Opening still works (with a warning): refusing would take a running service down.
        let mut store = SqliteStore::open(&path).expect("open");
        store.ping().expect("write");
        let found: Vec<(PathBuf, u32)> = shared_files(&path);
        let names: Vec<String> = found.iter().map(|(p, _)| p.display().to_string()).collect();
        let expected: Vec<String> = ["", "-wal", "-shm"].iter().map(|s| format!("{}{s}", path.display())).collect();
        // SQLite gives the -wal and -shm files the database file's mode.
        assert_eq!(names, expected);
        assert!(found.iter().all(|(_, mode)| *mode == 0o644), "{found:?}");
    }

    #[test]
    fn a_full_database_is_unavailable_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = SqliteStore::open(dir.path().join("chime.db")).expect("open");
        let ada = store.create_user("ada", "hash").expect("user");
        let (room, _) = store.create_room("r", RoomKind::GROUP, ada.id, "ada", 1, u64::MAX).expect("room");
        // The page limit is a setting of the connection, so it is set on the store's own: from
        // then on SQLite fails every write that needs a new page with SQLITE_FULL, exactly as it
        // does when the disk is full.
        let pages: i64 = store.conn.query_row("PRAGMA page_count", [], |row| row.get(0)).expect("page count");
        store.conn.execute_batch(&format!("PRAGMA max_page_count = {pages}")).expect("limit");
        let err = store.append_posts(&[message(room.id, &ada, "k", "x".repeat(64 << 10))]).expect_err("full");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert_eq!(store.deltas_after(room.id, Seq(0), 100).expect("log").len(), 1, "nothing written");
        assert_eq!(store.room(room.id).expect("room").expect("exists").last_seq, Seq(1));

        store.conn.execute_batch("PRAGMA max_page_count = 1073741823").expect("room again");
        let out = store.append_posts(&[message(room.id, &ada, "k", "x".repeat(64 << 10))]).expect("append");
        assert!(matches!(&out[0], PostOutcome::Inserted(d) if d.seq == Seq(2)), "{out:?}");
    }

    #[test]
    fn a_write_lock_held_elsewhere_is_unavailable_until_released() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chime.db");
        let mut store = SqliteStore::open_with(&path, &impatient()).expect("open");
        let ada = store.create_user("ada", "hash").expect("user");
        let other = Connection::open(&path).expect("second connection");
        other.execute_batch("BEGIN EXCLUSIVE").expect("take the write lock");

        let started = Instant::now();
        let err = store.create_user("bob", "hash").expect_err("locked");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(150) && waited < Duration::from_secs(3), "{waited:?}");
        let err = store.ping().expect_err("locked");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        // WAL readers never wait for the writer.
        assert_eq!(store.user_by_name("ada").expect("read"), Some(ada));

        other.execute_batch("COMMIT").expect("release");
        store.ping().expect("ping after release");
        store.create_user("bob", "hash").expect("write after release");
    }

    #[test]
    fn opening_a_database_locked_elsewhere_is_unavailable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chime.db");
        // Not yet in WAL mode, so an exclusive lock keeps everyone out, and switching to WAL
        // needs that lock.
        let other = Connection::open(&path).expect("plain connection");
        other.execute_batch("CREATE TABLE t (x INTEGER); BEGIN EXCLUSIVE; INSERT INTO t VALUES (1);").expect("lock");
        let err = SqliteStore::open_with(&path, &impatient()).err().expect("locked");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        other.execute_batch("COMMIT").expect("release");
        SqliteStore::open_with(&path, &impatient()).expect("open after release").ping().expect("ping");
    }

    /// Enough commits to cross SQLite's automatic checkpoint threshold (1000 pages).
    const COMMITS: u64 = 1100;

    /// Opens a store for the checkpoint tests and makes `COMMITS` commits of one frame each
    /// (pings, which always change their page).
    fn many_commits(path: &Path, options: &OpenOptions) -> (SqliteStore, u64) {
        let mut store = SqliteStore::open_with(path, options).expect("open");
        // Durability is not under test here; fsync on every commit only makes the test slow.
        store.conn.execute_batch("PRAGMA synchronous = OFF").expect("synchronous");
        let page_size: i64 = store.conn.query_row("PRAGMA page_size", [], |row| row.get(0)).expect("page size");
        for _ in 0..COMMITS {
            store.ping().expect("ping");
        }
        (store, from_db(page_size))
    }

    #[test]
    fn with_manual_checkpoints_the_wal_grows_until_checkpoint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chime.db");
        let (mut store, page_size) =
            many_commits(&path, &OpenOptions { manual_checkpoints: true, ..OpenOptions::default() });
        let frames = wal_frames(&path, page_size);
        // At least one frame per ping: so also every ping wrote to the WAL.
        assert!(frames >= COMMITS, "{frames} frames after {COMMITS} commits: a commit checkpointed");

        store.checkpoint().expect("checkpoint");
        // Everything was copied back, so the next commit starts the WAL over from its first frame.
        store.ping().expect("ping");
        let (log, checkpointed) = store.wal_checkpoint().expect("wal_checkpoint");
        assert!(log <= 2 && checkpointed == log, "{log} frames in the WAL, {checkpointed} checkpointed");
    }

    #[test]
    fn by_default_commits_checkpoint_automatically() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chime.db");
        let (mut store, page_size) = many_commits(&path, &OpenOptions::default());
        let frames = wal_frames(&path, page_size);
        assert!(frames < COMMITS, "{frames} frames after {COMMITS} commits: no commit checkpointed");
        let (log, _) = store.wal_checkpoint().expect("wal_checkpoint");
        assert!(log < 1000, "the WAL started over after the automatic checkpoint: {log} frames");
    }
}
