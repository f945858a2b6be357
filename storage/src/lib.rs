//! Chime's durable store.
//!
//! [`Store`] is the one interface the daemon's workers use; [`sqlite::SqliteStore`] (the embedded
//! default) and [`postgres::PgStore`] (production) implement it. Each worker thread owns one store
//! value (one database connection); nothing here is shared between threads.
//!
//! The model: every change in a room is an immutable delta with a per-room seq (1, 2, 3, ... with
//! no gaps, in commit order). Seqs are handed out from `rooms.last_seq` inside the transaction that
//! inserts the delta, so a seq exists only if its delta committed.
#![deny(missing_docs)]

mod batch;
pub mod postgres;
pub mod sqlite;

pub use chime_protocol::{Delta, DeltaKind, RoomKind};

/// A user's id.
pub type UserId = u64;
/// A room's id.
pub type RoomId = u64;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique name is taken (user name on register).
    #[error("already exists: {0}")]
    Conflict(String),
    /// The room or user does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The user is not a member of the room.
    #[error("not a member of room {0}")]
    NotMember(RoomId),
    /// The database failed; a retry may succeed.
    #[error("database error: {0}")]
    Database(String),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migration(String),
    /// A bad database URL or option.
    #[error("bad database configuration: {0}")]
    Config(String),
}

/// Result alias for store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// The id.
    pub id: UserId,
    /// The unique name.
    pub name: String,
    /// The argon2id PHC string.
    pub password_hash: String,
}

/// A new session: the token itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// The user it logs in.
    pub user_id: UserId,
    /// SHA-256 of the token.
    pub token_hash: [u8; 32],
    /// The client's address at login.
    pub ip: String,
    /// The client's user agent at login.
    pub user_agent: String,
    /// Creation time, Unix milliseconds.
    pub now_ms: i64,
}

/// A room as stored, with the room's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    /// The id.
    pub id: RoomId,
    /// The name.
    pub name: String,
    /// Its kind.
    pub kind: RoomKind,
    /// The seq of its latest delta.
    pub last_seq: u64,
}

/// A member of a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRecord {
    /// The user's id.
    pub user_id: UserId,
    /// The user's name.
    pub name: String,
    /// `"owner"` or `"member"` (named roles come later).
    pub role: String,
    /// Whether the member muted the room.
    pub muted: bool,
}

/// One post in a group commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPost {
    /// The room.
    pub room: RoomId,
    /// The author.
    pub author_id: UserId,
    /// The author's name (copied into the returned delta).
    pub author: String,
    /// The client's idempotency key, unique per (room, author). Empty means "no key": such a post
    /// is never taken for a duplicate.
    pub idempotency_key: String,
    /// The message.
    pub text: String,
    /// Commit time, Unix milliseconds.
    pub now_ms: i64,
}

/// What became of one post in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostOutcome {
    /// Written; the new delta, to publish.
    Inserted(Delta),
    /// The same (room, author, key) was written before: its seq and time. Nothing was written.
    Duplicate {
        /// The earlier delta's seq.
        seq: u64,
        /// The earlier delta's time.
        ts_ms: i64,
    },
    /// The author is not a member (or the room does not exist). Nothing was written.
    NotMember,
}

/// The store's interface. Every method is one transaction; a method that returns `Ok` has
/// committed durably (SQLite `synchronous=FULL` in WAL mode, PostgreSQL `synchronous_commit=on`).
pub trait Store: Send {
    /// Creates a user. `Conflict` when the name is taken.
    fn create_user(&mut self, name: &str, password_hash: &str) -> Result<UserRecord>;
    /// Looks a user up by name.
    fn user_by_name(&mut self, name: &str) -> Result<Option<UserRecord>>;
    /// Stores a session.
    fn create_session(&mut self, session: &NewSession) -> Result<()>;
    /// The user a live (not revoked) session token hash belongs to; records `now_ms` as last use.
    fn session_user(&mut self, token_hash: &[u8; 32], now_ms: i64) -> Result<Option<UserRecord>>;
    /// Revokes a session. Returns whether a live session was revoked.
    fn revoke_session(&mut self, token_hash: &[u8; 32], now_ms: i64) -> Result<bool>;

    /// Creates a room owned by `owner`, whose log starts with a `CREATE` delta (seq 1).
    fn create_room(
        &mut self,
        name: &str,
        kind: RoomKind,
        owner: UserId,
        owner_name: &str,
        now_ms: i64,
    ) -> Result<(RoomRecord, Delta)>;
    /// A room by id.
    fn room(&mut self, room: RoomId) -> Result<Option<RoomRecord>>;
    /// Adds a member and appends a `JOIN` delta. `Ok(None)` when already a member (no delta).
    fn join_room(&mut self, room: RoomId, user: UserId, user_name: &str, now_ms: i64) -> Result<Option<Delta>>;
    /// Removes a member and appends a `LEAVE` delta. `NotMember` when not a member.
    fn leave_room(&mut self, room: RoomId, user: UserId, user_name: &str, now_ms: i64) -> Result<Delta>;
    /// The rooms a user is in, by id.
    fn rooms_of_user(&mut self, user: UserId) -> Result<Vec<RoomRecord>>;
    /// Whether a user is a member of a room.
    fn is_member(&mut self, room: RoomId, user: UserId) -> Result<bool>;
    /// One page of members with user id > `after_user`, by user id.
    fn members(&mut self, room: RoomId, after_user: UserId, limit: u32) -> Result<Vec<MemberRecord>>;

    /// Group commit: every post in one transaction, outcomes in input order. Seqs within a room
    /// follow input order. A retry of a key already in the batch or the log is a `Duplicate`.
    fn append_posts(&mut self, posts: &[NewPost]) -> Result<Vec<PostOutcome>>;
    /// Up to `limit` deltas of a room with seq > `after`, in seq order.
    fn deltas_after(&mut self, room: RoomId, after: u64, limit: u32) -> Result<Vec<Delta>>;
}

/// The record and the `CREATE` delta (seq 1) of a room just created, as both stores return them.
pub(crate) fn created_room(
    id: RoomId,
    name: &str,
    kind: RoomKind,
    owner: UserId,
    owner_name: &str,
    now_ms: i64,
) -> (RoomRecord, Delta) {
    let room = RoomRecord { id, name: name.into(), kind, last_seq: 1 };
    let delta = Delta {
        room: id,
        seq: 1,
        kind: DeltaKind::CREATE,
        author_id: owner,
        author: owner_name.into(),
        ts_ms: now_ms,
        text: name.into(),
    };
    (room, delta)
}

/// Opens a store from a URL: `sqlite:PATH` (or a bare path) or `postgres://...` /
/// `postgresql://...`, and applies migrations.
pub fn open(url: &str) -> Result<Box<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Box::new(postgres::PgStore::connect(url)?))
    } else {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        Ok(Box::new(sqlite::SqliteStore::open(path)?))
    }
}

/// The wall clock in Unix milliseconds (the time stamps every row carries).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// An id or seq as both databases store it (signed 64-bit). Values past `i64::MAX` are never
/// assigned, so clamping keeps lookups of such values empty instead of failing.
fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An id or seq read back; the schema never stores a negative one.
fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
