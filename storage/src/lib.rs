//! Chime's durable store.
//!
//! [`Store`] is the one interface the daemon's workers use; [`sqlite::SqliteStore`] (the embedded
//! default) and [`postgres::PgStore`] (production) implement it. Each worker thread owns one store
//! value (one database connection); nothing here is shared between threads.
//!
//! The model: every change in a room is an immutable delta with a per-room seq (1, 2, 3, ... with
//! no gaps, in commit order). Seqs are handed out from `rooms.last_seq` inside the transaction that
//! inserts the delta, so a seq exists only if its delta committed.
//!
//! When the database goes away (PostgreSQL restarting, the disk full, another process holding
//! SQLite's write lock) every method fails with [`StoreError::Unavailable`]. A store is not
//! repaired in place: its owner drops it, answers its clients with a retryable error and opens a
//! new one with [`open_with`] (with backoff) until [`Store::ping`] succeeds again. The store itself
//! logs failures at debug level only, so an outage is reported once by its owner rather than once
//! per failed call.
#![deny(missing_docs)]

pub mod actions;
mod batch;
pub mod files;
pub mod moderation;
pub mod partition;
pub mod postgres;
pub mod search;
pub mod secret;
pub mod sqlite;

use std::time::Duration;

pub use actions::{ActionOutcome, MessageAction, MessageRecord, NewAction};
pub use chime_protocol::{Permissions, RoomId, RoomKind, Seq, ServerId, UserId};
pub use files::{FileRecord, NewFile, NewUpload, UploadRecord};
pub use moderation::{MemberAction, ModerationOutcome, NewModeration};
pub use partition::{PartitionRecord, DEFAULT_PARTITION_SIZE};

/// A login session's id.
pub type SessionId = u64;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique name is taken (a user name on register, an email on a profile update).
    #[error("already exists: {0}")]
    Conflict(String),
    /// The room or user does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The user is not a member of the room.
    #[error("not a member of room {0}")]
    NotMember(RoomId),
    /// The user's role does not allow what was asked (editing another's message, deleting
    /// without the right). Nothing was written.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The user already has as many of something as allowed (rooms, for now). Nothing was written.
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// The database cannot be reached or cannot write right now (connection lost, server shutting
    /// down or starting, disk full, file locked by another process). Retrying later on a newly
    /// opened store can succeed; this one should be dropped.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database failed the operation for another reason (a bug, a constraint the store does
    /// not map, a corrupt file). Not a sign that the database is down; whether a retry helps
    /// depends on the cause.
    #[error("database error: {0}")]
    Database(String),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migration(String),
    /// A bad database URL or option.
    #[error("bad database configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether this is [`StoreError::Unavailable`]: the database is down, not the request wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
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

/// A user's profile as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRecord {
    /// The user's id.
    pub id: UserId,
    /// The user's name.
    pub name: String,
    /// The email address as the user typed it, if any.
    pub email: Option<String>,
    /// The display name the user chose; `None` when they never did (the user name is shown).
    pub display_name: Option<String>,
}

/// A change to a profile. Fields that are `None` are left as they are; the daemon has checked
/// the values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileUpdate {
    /// `Some(None)` removes the email, `Some(Some(address))` sets it.
    pub email: Option<Option<String>>,
    /// The new display name.
    pub display_name: Option<String>,
}

/// What makes two email addresses the same account's: equal lower-cased forms (Unicode lower
/// case). Both stores keep this next to the address, under a unique index, and compute it here
/// rather than with SQL's `lower()`, which folds only ASCII in SQLite and all of Unicode in
/// PostgreSQL: the two must not disagree on which addresses collide.
pub fn email_key(email: &str) -> String {
    email.to_lowercase()
}

/// How much a member hears from a room: the `room_members.notify` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NotifyLevel {
    /// Every message (the default; stored 0).
    #[default]
    All,
    /// Only messages that mention the member (stored 1).
    Mentions,
    /// Nothing (stored 2).
    Nothing,
}

impl NotifyLevel {
    /// The stored code.
    pub fn code(self) -> i16 {
        match self {
            NotifyLevel::All => 0,
            NotifyLevel::Mentions => 1,
            NotifyLevel::Nothing => 2,
        }
    }

    /// The level of a stored code; `None` for a code this build does not know (the schema's CHECK
    /// allows none).
    pub fn from_code(code: i64) -> Option<NotifyLevel> {
        match code {
            0 => Some(NotifyLevel::All),
            1 => Some(NotifyLevel::Mentions),
            2 => Some(NotifyLevel::Nothing),
            _ => None,
        }
    }
}

/// One setting to store; the daemon has checked the key and the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingWrite<'a> {
    /// The user's notification level in a room they are a member of.
    Notify {
        /// The room.
        room: RoomId,
        /// The level.
        level: NotifyLevel,
    },
    /// An account-wide setting (a row of `user_settings`).
    Account {
        /// The key.
        key: &'a str,
        /// The value.
        value: &'a str,
    },
}

/// One page of a user's settings as stored: what was set, not the defaults (which are the
/// daemon's), read in one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsRecord {
    /// The user's settings version: how many changes were stored.
    pub version: u64,
    /// Every account-wide setting the user set, by key.
    pub account: Vec<(String, String)>,
    /// The page's rooms whose level is not [`NotifyLevel::All`], by room id.
    pub notify: Vec<(RoomId, NotifyLevel)>,
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
    /// Creation time, Unix milliseconds; also its first last use.
    pub now_ms: i64,
}

/// A session as stored (without its token hash, which only serves to find it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The id, unique across users; what a user names to revoke one session.
    pub id: SessionId,
    /// The user it logs in.
    pub user_id: UserId,
    /// The client's address at login.
    pub ip: String,
    /// The client's user agent at login.
    pub user_agent: String,
    /// Login time, Unix milliseconds.
    pub created_at_ms: i64,
    /// When the session was last used to log in or last disconnected, Unix milliseconds.
    pub last_used_at_ms: i64,
}

/// How long a session lives. Both bounds apply: a stolen token stops working after `max_age_ms`
/// however busy it is kept, and a forgotten device after `idle_ms` without use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Longest time since last use, in milliseconds.
    pub idle_ms: i64,
    /// Longest time since login, in milliseconds.
    pub max_age_ms: i64,
}

impl SessionLimits {
    /// Whether a session that is not revoked is still live at `now_ms`. This is the one rule both
    /// stores apply (they read the rows and ask here), so they cannot disagree on an edge.
    pub fn is_live(&self, session: &SessionRecord, now_ms: i64) -> bool {
        // Saturating: a clock that stepped back gives a negative age, which is young, not expired.
        now_ms.saturating_sub(session.last_used_at_ms) <= self.idle_ms
            && now_ms.saturating_sub(session.created_at_ms) <= self.max_age_ms
    }
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
    pub last_seq: Seq,
}

/// A room with its member count and one user's role in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomDetailsRecord {
    /// The room.
    pub room: RoomRecord,
    /// How many members it has (kept by the database as members come and go, not counted).
    pub members: u64,
    /// The user's role, `None` when the user is not a member.
    pub role: Option<String>,
}

/// What a stored delta does: the `deltas.kind` column. The store's own codes, so that the schema
/// and the wire (`chime_protocol::DeltaKind`) can change separately; today they share values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordKind(pub u8);

impl RecordKind {
    /// The room was created (seq 1); the body is the room's name.
    pub const CREATE: RecordKind = RecordKind(1);
    /// A message; the body is its text.
    pub const MESSAGE: RecordKind = RecordKind(2);
    /// The author joined; no body.
    pub const JOIN: RecordKind = RecordKind(3);
    /// The author left; no body.
    pub const LEAVE: RecordKind = RecordKind(4);
    /// An edit of message `target`; the body is the new text.
    pub const EDIT: RecordKind = RecordKind(5);
    /// Message `target` was deleted; no body.
    pub const DELETE: RecordKind = RecordKind(6);
    /// A reaction to message `target`; the body is the emoji.
    pub const REACT: RecordKind = RecordKind(7);
    /// A reaction to message `target` taken back; the body is the emoji.
    pub const UNREACT: RecordKind = RecordKind(8);
    /// A message answering message `target`; the body is its text.
    pub const REPLY: RecordKind = RecordKind(9);
    /// Message `target` was pinned; no body.
    pub const PIN: RecordKind = RecordKind(10);
    /// Message `target` was unpinned; no body.
    pub const UNPIN: RecordKind = RecordKind(11);
    /// User `target` was made a member by the author; the body is their name.
    pub const INVITE: RecordKind = RecordKind(12);
    /// Member `target` was removed by the author; the body is their name.
    pub const KICK: RecordKind = RecordKind(13);
    /// User `target` was banned (and removed) by the author; the body is their name.
    pub const BAN: RecordKind = RecordKind(14);
    /// User `target`'s ban was lifted; the body is their name.
    pub const UNBAN: RecordKind = RecordKind(15);
    /// Member `target` may no longer post; the body is their name.
    pub const MUTE: RecordKind = RecordKind(16);
    /// Member `target` may post again; the body is their name.
    pub const UNMUTE: RecordKind = RecordKind(17);
    /// Member `target` got a role; the body is the role.
    pub const ROLE: RecordKind = RecordKind(18);
    /// A role was defined (or redefined) for the room; the body is `NAME=PERMISSION_BITS`, or
    /// `NAME` alone when the definition was removed.
    pub const ROLE_DEFINED: RecordKind = RecordKind(19);
    /// The author started a call; the body is opaque media signalling, no target.
    pub const CALL_INVITE: RecordKind = RecordKind(20);
    /// The author joined call `target` (the seq of its invite); the body is signalling.
    pub const CALL_ACCEPT: RecordKind = RecordKind(21);
    /// The author ended or left call `target`; the body is signalling.
    pub const CALL_END: RecordKind = RecordKind(22);
    /// A file was shared; `target` is the file record's id, the body is
    /// [`files::encode_body`]'s text.
    pub const FILE_SHARED: RecordKind = RecordKind(23);
}

/// A delta as the store keeps it (one row of `deltas`, with its author's name). The daemon turns
/// it into the wire's `chime_protocol::Delta`; the two types change separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaRecord {
    /// The room.
    pub room: RoomId,
    /// Its position in the room's log.
    pub seq: Seq,
    /// What it does.
    pub kind: RecordKind,
    /// The author.
    pub author_id: UserId,
    /// The author's name.
    pub author: String,
    /// Commit time, Unix milliseconds.
    pub ts_ms: i64,
    /// The `body` column: a message's, reply's or edit's text, a created room's name, a
    /// reaction's emoji, empty otherwise.
    pub body: String,
    /// The `target` column: the message an edit, delete, reaction or pin acts on, or a reply
    /// answers.
    pub target: Option<Seq>,
}

/// The direct dialog of two users, as [`SharedStore::open_direct`] found or made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectRoom {
    /// The room.
    pub room: RoomRecord,
    /// The other user.
    pub peer: UserId,
    /// The room's `CREATE` delta when this call created it (both users are members from then on);
    /// `None` when it existed.
    pub created: Option<DeltaRecord>,
}

/// A server (community) as stored, with one user's role in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRecord {
    /// The id.
    pub id: ServerId,
    /// The name.
    pub name: String,
    /// What it is about.
    pub description: String,
    /// Whether anyone may join it by id.
    pub public: bool,
    /// Who created it.
    pub owner: UserId,
    /// How many members it has (kept as members come and go).
    pub members: u64,
    /// How many it may have.
    pub member_cap: u64,
    /// The user's role, `None` when not a member.
    pub role: Option<String>,
}

/// A new server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewServer {
    /// Its owner.
    pub owner: UserId,
    /// The owner's name, for the `general` channel's `CREATE` delta.
    pub owner_name: String,
    /// The name.
    pub name: String,
    /// What it is about.
    pub description: String,
    /// Whether anyone may join it by id.
    pub public: bool,
    /// How many members it may have.
    pub member_cap: u64,
    /// Creation time.
    pub now_ms: i64,
}

/// A new channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewChannel {
    /// Its server.
    pub server: ServerId,
    /// Who creates it (needs `manage_channels` in the server).
    pub actor: UserId,
    /// Their name, for the `CREATE` delta.
    pub actor_name: String,
    /// The channel's name.
    pub name: String,
    /// `CHANNEL` or `VOICE`.
    pub kind: RoomKind,
    /// Roles that may read it; empty: every member.
    pub read_roles: Vec<String>,
    /// Roles that may post in it; empty: every member who may read.
    pub post_roles: Vec<String>,
    /// Creation time.
    pub now_ms: i64,
}

/// A member's position in a room and what is new there for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadRecord {
    /// The room.
    pub room: RoomId,
    /// Its head.
    pub head: Seq,
    /// The last seq delivered to one of the user's devices.
    pub delivered: Seq,
    /// The last seq the user read.
    pub read: Seq,
    /// Messages (and shared files) by others after `read` (counted up to [`UNREAD_CAP`]).
    pub unread: u64,
    /// Mentions of the user after `read`.
    pub mentions: u64,
}

/// Unread counts stop here: "999+" is all a reader needs, and counting stays bounded however
/// long someone stays away.
pub const UNREAD_CAP: u64 = 10_000;

/// A mention of a user, for their notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MentionRecord {
    /// The room.
    pub room: RoomId,
    /// The message.
    pub seq: Seq,
    /// Who wrote it.
    pub author: String,
    /// When.
    pub ts_ms: i64,
    /// Its text now (`None` once deleted).
    pub text: Option<String>,
    /// Whether the user has read up to it.
    pub read: bool,
}

/// The user names a message mentions (`@name`), each once, in order; names are what
/// registration allows (letters, digits, `_`, `-`, `.`).
pub fn mentioned_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for part in text.split('@').skip(1) {
        let name: String =
            part.chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')).take(32).collect();
        let name = name.trim_end_matches('.').to_string();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Which end of a room's log a page is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Order {
    /// Ascending seqs, after a cursor.
    OldestFirst,
    /// Descending seqs, before a cursor.
    NewestFirst,
}

impl Order {
    /// The inclusive seq range of a page of `limit` deltas from `cursor` (see
    /// [`SharedStore::deltas_page`]), lowest first; `None` when it is empty.
    pub fn range(self, cursor: Seq, limit: u32) -> Option<(Seq, Seq)> {
        let limit = u64::from(limit);
        let (lo, hi) = match self {
            Order::OldestFirst => (cursor.get().saturating_add(1), cursor.get().saturating_add(limit)),
            Order::NewestFirst => (cursor.get().saturating_sub(limit).max(1), cursor.get().saturating_sub(1)),
        };
        (limit > 0 && lo <= hi).then_some((Seq(lo), Seq(hi)))
    }
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
    Inserted(DeltaRecord),
    /// The same (room, author, key) was written before: its seq and time. Nothing was written.
    Duplicate {
        /// The earlier delta's seq.
        seq: Seq,
        /// The earlier delta's time.
        ts_ms: i64,
    },
    /// The author is not a member (or the room does not exist). Nothing was written.
    NotMember,
    /// The author's role does not allow posting, or a moderator muted them. Nothing was written.
    Forbidden,
}

/// What every worker may do with the store: reads, accounts, sessions, creating a room (a new
/// log nobody else writes yet). Every method is one transaction; a method that returns `Ok` has
/// committed durably (SQLite `synchronous=FULL` in WAL mode, PostgreSQL `synchronous_commit=on`).
///
/// Writes to an existing room's log are not here but in [`Store`]: the daemon hands jobs on its
/// shared queue a `&mut dyn SharedStore`, so that only a room's own shard worker (the one writer
/// of its log, which publishes its deltas in seq order) can append to it. A room write put on the
/// wrong queue does not compile.
pub trait SharedStore: Send {
    /// Creates a user. `Conflict` when the name is taken.
    fn create_user(&mut self, name: &str, password_hash: &str) -> Result<UserRecord>;
    /// Looks a user up by name.
    fn user_by_name(&mut self, name: &str) -> Result<Option<UserRecord>>;
    /// Stores a session (its last use is its creation) and returns it with its id.
    fn create_session(&mut self, session: &NewSession) -> Result<SessionRecord>;
    /// Logs in with a session token: when the session with this token hash is live under `limits`,
    /// records `now_ms` as its last use (never moving it back) and returns its user and the updated
    /// session. A session that exists but has expired is revoked at `now_ms`, so it stays dead
    /// whatever the limits are later, and gives `None`, as do unknown and revoked ones.
    fn session_user(
        &mut self,
        token_hash: &[u8; 32],
        now_ms: i64,
        limits: &SessionLimits,
    ) -> Result<Option<(UserRecord, SessionRecord)>>;
    /// The user's live sessions under `limits`, by id. Reads only: expired sessions are left for
    /// [`Store::session_user`] to revoke.
    fn list_sessions(&mut self, user: UserId, now_ms: i64, limits: &SessionLimits) -> Result<Vec<SessionRecord>>;
    /// Revokes the user's session `which`, or every session of the user when `None`, at `now_ms`.
    /// Returns the ids revoked, ascending: empty when there was nothing to revoke, including when
    /// `which` is another user's session, which is left alone. Any session not yet revoked counts,
    /// also one that expired without being marked (it is dead either way; revoking it is harmless).
    fn revoke_sessions(&mut self, user: UserId, which: Option<SessionId>, now_ms: i64) -> Result<Vec<SessionId>>;
    /// Records `now_ms` as the last use of each session that is not revoked, unless it was used
    /// later already, in one transaction. Called for connections that close (and, now and then,
    /// for those still open), so "last seen" is right and idle expiry counts from the end of a
    /// connection, not from its login. Unknown and revoked sessions are skipped, not errors.
    fn touch_sessions(&mut self, sessions: &[SessionId], now_ms: i64) -> Result<()>;

    /// A user's profile by id; `None` when there is no such user.
    fn profile(&mut self, user: UserId) -> Result<Option<ProfileRecord>>;
    /// A user's profile by name; `None` when there is no such user.
    fn profile_by_name(&mut self, name: &str) -> Result<Option<ProfileRecord>>;
    /// Changes a user's email and display name as `update` says, and returns the profile after.
    /// `Conflict` when the email is another user's (by [`email_key`]); `NotFound` when there is no
    /// such user. Nothing is written when it fails.
    fn update_profile(&mut self, user: UserId, update: &ProfileUpdate) -> Result<ProfileRecord>;
    /// Stores one setting and bumps the user's settings version, in one transaction; returns the
    /// new version. `NotMember` for the level of a room the user is not a member of (or that does
    /// not exist); `NotFound` when there is no such user. Nothing is written when it fails.
    fn set_setting(&mut self, user: UserId, setting: &SettingWrite<'_>) -> Result<u64>;
    /// One page of a user's settings, in one snapshot: the version, every account-wide setting
    /// set, and up to `limit` rooms with id > `after_room` whose level is not the default, by id.
    /// `NotFound` when there is no such user.
    fn settings(&mut self, user: UserId, after_room: RoomId, limit: u32) -> Result<SettingsRecord>;

    /// Creates a room owned by `owner`, whose log starts with a `CREATE` delta (seq 1).
    /// `LimitReached` when the owner is already a member of `max_rooms` rooms (nothing written).
    fn create_room(
        &mut self,
        name: &str,
        kind: RoomKind,
        owner: UserId,
        owner_name: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> Result<(RoomRecord, DeltaRecord)>;
    /// The direct dialog of `user` with the user named `peer`, created (both members, a `CREATE`
    /// delta by `user`, named after both) when there is none yet. Exactly one per pair however
    /// the two ask, even at the same time. `NotFound` when there is no such peer; `LimitReached`
    /// when creating it would put either user over `max_rooms` (nothing written).
    fn open_direct(
        &mut self,
        user: UserId,
        user_name: &str,
        peer: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> Result<DirectRoom>;
    /// A room by id.
    fn room(&mut self, room: RoomId) -> Result<Option<RoomRecord>>;

    /// Creates a server owned by `owner` with its first channel, `general` (its `CREATE` delta
    /// returned). `LimitReached` when the owner is in `max_servers` servers.
    fn create_server(
        &mut self,
        server: &NewServer,
        max_servers: u64,
    ) -> Result<(ServerRecord, RoomRecord, DeltaRecord)>;
    /// Joins a public server: one row, whatever its size. Returns the server and the channels
    /// the user may now read; `Ok` with `joined` false when already a member. `NotFound` for no
    /// such server, `Forbidden` for a private one, `LimitReached` at the member cap or when the
    /// user is in `max_servers` servers.
    fn join_server(
        &mut self,
        server: ServerId,
        user: UserId,
        now_ms: i64,
        max_servers: u64,
    ) -> Result<(ServerRecord, Vec<RoomRecord>, bool)>;
    /// Leaves a server; returns the channels the user could read. `NotMember` when not a member,
    /// `Forbidden` for its owner.
    fn leave_server(&mut self, server: ServerId, user: UserId) -> Result<Vec<RoomId>>;
    /// One page of the servers a user is in, by id.
    fn servers_page(&mut self, user: UserId, after: ServerId, limit: u32) -> Result<Vec<ServerRecord>>;
    /// Creates a channel (a room of the server; its log starts with a `CREATE` delta). Needs
    /// `manage_channels` in the server (`Forbidden`), membership (`NotMember`).
    fn create_channel(&mut self, channel: &NewChannel) -> Result<(RoomRecord, DeltaRecord)>;
    /// Gives a member of a server a role (built-in, or defined with [`SharedStore::define_server_role`]),
    /// under the rank rules of [`moderation`]. Returns whether it changed. `NotFound` for no such
    /// user, member or role.
    fn set_server_role(&mut self, server: ServerId, actor: UserId, target: &str, role: &str) -> Result<bool>;
    /// Defines (or with `None` removes) a named role of a server (`member` redefines the default).
    fn define_server_role(
        &mut self,
        server: ServerId,
        actor: UserId,
        name: &str,
        perms: Option<Permissions>,
    ) -> Result<()>;

    /// The rooms a user is in, by id.
    fn rooms_of_user(&mut self, user: UserId) -> Result<Vec<RoomRecord>>;
    /// One page of the rooms a user is in: up to `limit` with id > `after_room`, by id.
    fn rooms_page(&mut self, user: UserId, after_room: RoomId, limit: u32) -> Result<Vec<RoomRecord>>;
    /// Whether a user is a member of a room.
    fn is_member(&mut self, room: RoomId, user: UserId) -> Result<bool>;
    /// A room, its member count and `user`'s role in it; `None` when there is no such room.
    fn room_details(&mut self, room: RoomId, user: UserId) -> Result<Option<RoomDetailsRecord>>;
    /// One page of members with user id > `after_user`, by user id.
    fn members(&mut self, room: RoomId, after_user: UserId, limit: u32) -> Result<Vec<MemberRecord>>;

    /// Records what the user has been delivered and has read in a room (each only moves
    /// forward, and never past the head); returns the room's unread state after it. `NotMember`
    /// when the user may not read the room.
    fn mark_read(&mut self, room: RoomId, user: UserId, delivered: Seq, read: Seq) -> Result<UnreadRecord>;
    /// The unread state of the user's rooms with id > `after`, up to `limit`, by id: only rooms
    /// with something unread or a mention.
    fn unread(&mut self, user: UserId, after: RoomId, limit: u32) -> Result<Vec<UnreadRecord>>;
    /// The user's most recent mentions in rooms they may still read, newest first, up to
    /// `limit`.
    fn mentions(&mut self, user: UserId, limit: u32) -> Result<Vec<MentionRecord>>;
    /// Up to `limit` deltas of a room with seq > `after`, in seq order.
    fn deltas_after(&mut self, room: RoomId, after: Seq, limit: u32) -> Result<Vec<DeltaRecord>>;
    /// Up to `limit` messages (`MESSAGE` and `REPLY` deltas) of a room with seq < `before` (0: no
    /// bound), newest first, in their current state as `user` sees them (`mine` on reactions).
    /// `NotMember` when the user is not a member; `NotFound` when there is no such room.
    fn messages_before(&mut self, room: RoomId, user: UserId, before: Seq, limit: u32) -> Result<Vec<MessageRecord>>;
    /// One page of a room's log for a restore: oldest first, the deltas with seqs `cursor + 1 ..=
    /// cursor + limit`, ascending; newest first, those with seqs `cursor - limit ..= cursor - 1`
    /// (never below 1), descending. Seqs have no gaps, so the page's range is known before it is
    /// read: the read is bounded on both ends and touches the one or two partitions it lies in.
    /// Membership is the caller's to check (it reads the head with it).
    fn deltas_page(&mut self, room: RoomId, order: Order, cursor: Seq, limit: u32) -> Result<Vec<DeltaRecord>>;
    /// A room's log partitions, by number (see [`partition`]).
    fn partitions(&mut self, room: RoomId) -> Result<Vec<PartitionRecord>>;
    /// Up to `limit` messages of a room with seq < `before` (0: no bound) whose current text has
    /// every one of `words` (as [`search::parse_query`] gives them), newest first, in their
    /// current state as `user` sees them. Deleted messages are never found; edited ones are found
    /// by their latest text only. `NotMember` when the user is not a member; `NotFound` when there
    /// is no such room.
    fn search(
        &mut self,
        room: RoomId,
        user: UserId,
        words: &[String],
        before: Seq,
        limit: u32,
    ) -> Result<Vec<MessageRecord>>;

    /// A cheap proof that the store works, errors classified like every other call's. SQLite
    /// commits a one-row write (so the file is writable, not locked, and the disk has room for a
    /// WAL frame); PostgreSQL runs `SELECT 1`.
    fn ping(&mut self) -> Result<()>;
    /// Moves committed WAL frames into the database file without ever waiting for a writer
    /// (SQLite `wal_checkpoint(PASSIVE)`); nothing on PostgreSQL. Meant for a housekeeping thread
    /// when the workers open with [`OpenOptions::manual_checkpoints`].
    fn checkpoint(&mut self) -> Result<()>;

    /// Whom message `seq` of `room` (by `author`) should notify through a push gateway: the users
    /// it mentions, and in a direct dialog the other user, each once (a mention wins over the
    /// dialog), unless their notification level for the room is `none` or they muted it. By user
    /// id. Mentions are those recorded when the message was written.
    fn push_targets(&mut self, room: RoomId, seq: Seq, author: UserId) -> Result<Vec<PushTarget>>;

    /// Invites the user named `target` to a server ([`MemberAction::Invite`]: an invitation that
    /// the user's next [`SharedStore::join_server`] uses up, the only way into a private server),
    /// bans them ([`MemberAction::Ban`]: removed if a member, invitation dropped, refused by
    /// `join_server` until unbanned) or unbans them, judged by [`moderation::judge`] against the
    /// actor's server role (`invite`, `ban`). `NotFound` for no such server membership of the
    /// actor or no such user; `Forbidden` when not allowed or for another action.
    fn moderate_server(
        &mut self,
        server: ServerId,
        actor: UserId,
        target: &str,
        action: &MemberAction,
        now_ms: i64,
    ) -> Result<ServerModerated>;

    /// When each of `users` was last seen: the latest last use of any of their sessions (written
    /// when a connection closes), Unix ms; users never seen are left out. By user id.
    fn last_seen(&mut self, users: &[UserId]) -> Result<Vec<(UserId, i64)>>;
    /// Begins an upload by `u.user` to share in `u.room`, who needs `post` there (`NotMember`,
    /// `Forbidden`, `NotFound` for no such room); `LimitReached` when the user has
    /// [`files::MAX_OPEN_UPLOADS`] unfinished uploads.
    fn create_upload(&mut self, u: &NewUpload) -> Result<UploadRecord>;
    /// Upload `id` of `user`; `NotFound` when there is none (or it is another user's).
    fn upload(&mut self, id: u64, user: UserId) -> Result<UploadRecord>;
    /// File record `file`, if `user` may read a room it was shared in; `NotFound` otherwise (so
    /// a file's existence is not leaked to those who may not download it).
    fn file_for(&mut self, file: u64, user: UserId) -> Result<FileRecord>;
    /// Removes the `contents` row of `sha256` if no file record refers to it any more, and says
    /// whether it did: then its bytes may go. Call under the content store's lock for `sha256`.
    fn drop_content(&mut self, sha256: &[u8; 32]) -> Result<bool>;
    /// Up to `limit` hashes whose content no file record refers to (to collect).
    fn unreferenced_contents(&mut self, limit: u32) -> Result<Vec<[u8; 32]>>;
}

/// What [`SharedStore::moderate_server`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerModerated {
    /// The user acted on.
    pub user: UserId,
    /// Whether anything changed (an invitation of a member, a ban of a banned user: no).
    pub changed: bool,
    /// A ban of a member: the channels they could read and no longer can.
    pub left_channels: Vec<RoomId>,
}

/// Checks that a server moderation step is one servers have.
pub(crate) fn check_server_action(action: &MemberAction) -> Result<()> {
    match action {
        MemberAction::Invite | MemberAction::Ban | MemberAction::Unban => Ok(()),
        _ => Err(StoreError::Forbidden("servers have invite, ban and unban".into())),
    }
}

/// Why a user is notified of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushReason {
    /// The message mentions them.
    Mention,
    /// It was written to them in a direct dialog.
    Direct,
}

/// A user a message should notify (see [`SharedStore::push_targets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTarget {
    /// The user.
    pub user: UserId,
    /// Their name.
    pub name: String,
    /// Why.
    pub reason: PushReason,
}

/// Rows of `(user id, name, reason code)` from either store's push-target query (0 mention, 1
/// direct) as [`SharedStore::push_targets`] returns them: one per user, a mention first.
pub(crate) fn push_targets_from(rows: impl IntoIterator<Item = (i64, String, i64)>) -> Vec<PushTarget> {
    let mut out: Vec<PushTarget> = Vec::new();
    for (user, name, reason) in rows {
        let reason = if reason == 0 { PushReason::Mention } else { PushReason::Direct };
        let user: UserId = from_db(user);
        match out.iter_mut().find(|t| t.user == user) {
            Some(t) if reason == PushReason::Mention => t.reason = reason,
            Some(_) => {}
            None => out.push(PushTarget { user, name, reason }),
        }
    }
    out.sort_by_key(|t| t.user);
    out
}

/// The whole store: [`SharedStore`] plus the writes that append to an existing room's log, which
/// only the room's shard worker calls.
pub trait Store: SharedStore {
    /// Adds a member and appends a `JOIN` delta. `Ok(None)` when already a member (no delta), even
    /// at the cap; `NotFound` when the room does not exist; `Forbidden` for a direct dialog;
    /// `LimitReached` when the user is already a member of `max_rooms` rooms (nothing written).
    fn join_room(
        &mut self,
        room: RoomId,
        user: UserId,
        user_name: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> Result<Option<DeltaRecord>>;
    /// Removes a member and appends a `LEAVE` delta. `NotMember` when not a member; `Forbidden`
    /// for a direct dialog, which both sides keep.
    fn leave_room(&mut self, room: RoomId, user: UserId, user_name: &str, now_ms: i64) -> Result<DeltaRecord>;
    /// Group commit: every post in one transaction, outcomes in input order. Seqs within a room
    /// follow input order. A retry of a key already in the batch or the log is a `Duplicate`.
    fn append_posts(&mut self, posts: &[NewPost]) -> Result<Vec<PostOutcome>>;
    /// Appends an action on an earlier message (or a reply to it) after checking it with
    /// [`actions::judge`] against the actor's role, and applies it to the message's state (edited
    /// text, deleted, reaction counts by increment, pinned), in one transaction. `NotMember` when
    /// the actor is not a member, `NotFound` for no such message (or a deleted one), `Forbidden`
    /// when the role does not allow it.
    fn act(&mut self, action: &NewAction) -> Result<ActionOutcome>;
    /// A moderation step on one user (invite, kick, ban, unban, mute, unmute, role), judged by
    /// [`moderation::judge`] against the actor's role and the target's, written with its delta in
    /// one transaction. `NotMember` when the actor is not a member; `NotFound` for no such room
    /// or user; `Forbidden` when the actor may not, or for a direct dialog.
    fn moderate(&mut self, m: &NewModeration) -> Result<ModerationOutcome>;
    /// Appends a call signalling delta (`CALL_INVITE`, `CALL_ACCEPT` or `CALL_END`) by `actor`,
    /// who needs `post`. ACCEPT and END name their call by the seq of its `CALL_INVITE` in the
    /// same room (`NotFound` otherwise).
    fn signal(
        &mut self,
        room: RoomId,
        actor: (UserId, &str),
        kind: RecordKind,
        call: Seq,
        data: &str,
        now_ms: i64,
    ) -> Result<DeltaRecord>;
    /// Defines (or with `perms` none, removes) a named role of the room, or redefines `member`
    /// (the room-wide default), with a `ROLE_DEFINED` delta. Needs `manage_roles`; `owner` cannot
    /// be defined. Members holding a removed role keep the name and hold no permission until
    /// given another.
    fn define_role(
        &mut self,
        room: RoomId,
        actor: UserId,
        actor_name: &str,
        name: &str,
        perms: Option<Permissions>,
        now_ms: i64,
    ) -> Result<DeltaRecord>;
    /// Records a verified, stored upload: its content's reference (created at one, or counted
    /// up), the file record, its permission for the room, and a `FILE_SHARED` delta by the owner
    /// (who needs `post`), and removes the upload session; one transaction.
    fn share_file(&mut self, f: &NewFile) -> Result<(FileRecord, DeltaRecord)>;
    /// Copies message `seq` of `room` (which `actor` must read) into `to_room` (where `actor`
    /// needs `post`) as a new delta of `to_room`: a `MESSAGE` or a `REPLY`'s text as a `MESSAGE`
    /// (its latest text), a `FILE_SHARED` as a new file record on the same content with its own
    /// permission for `to_room`. `NotFound` for no such message (or a deleted one), or another
    /// kind.
    fn forward(
        &mut self,
        actor: (UserId, &str),
        room: RoomId,
        seq: Seq,
        to_room: RoomId,
        now_ms: i64,
    ) -> Result<DeltaRecord>;
}

/// Refuses a new membership when `user` already has `count` of at most `max_rooms`.
pub(crate) fn check_room_cap(user: UserId, count: u64, max_rooms: u64) -> Result<()> {
    if count >= max_rooms {
        return Err(StoreError::LimitReached(format!(
            "user {user} is in {count} rooms, the most allowed is {max_rooms}"
        )));
    }
    Ok(())
}

/// The name of the direct dialog of two users: both names, in user id order.
pub(crate) fn direct_name(a: (UserId, &str), b: (UserId, &str)) -> String {
    let (first, second) = if a.0 < b.0 { (a.1, b.1) } else { (b.1, a.1) };
    format!("{first} & {second}")
}

/// The channel rules both stores apply on top of a member's role: a channel that names who may
/// post takes `post` from everyone else below admin. (Who may read is in the `room_access` view:
/// a member who may not read a channel has no access row at all.)
pub(crate) fn channel_perms(role: &str, perms: Permissions, post_roles: Option<&str>) -> Permissions {
    match post_roles {
        Some(list) if moderation::rank(role) < 3 && !list.split(',').any(|r| r == role) => {
            perms.without(Permissions::POST)
        }
        _ => perms,
    }
}

/// Refuses joining or leaving a channel as a room: one joins or leaves its server.
pub(crate) fn check_not_channel(room: RoomId, kind: RoomKind, what: &str) -> Result<()> {
    if kind == RoomKind::CHANNEL || kind == RoomKind::VOICE {
        return Err(StoreError::Forbidden(format!("room {room} is a channel; {what} its server instead")));
    }
    Ok(())
}

/// Roles as a channel stores them: `None` for everyone, else comma-separated.
pub(crate) fn role_list(roles: &[String]) -> Option<String> {
    if roles.is_empty() {
        None
    } else {
        Some(roles.join(","))
    }
}

/// Refuses joining or leaving a direct dialog.
pub(crate) fn check_not_direct(room: RoomId, kind: RoomKind, what: &str) -> Result<()> {
    if kind == RoomKind::DIRECT {
        return Err(StoreError::Forbidden(format!("room {room} is a direct dialog; nobody can {what} it")));
    }
    Ok(())
}

/// Refuses a new server membership when `user` already is in `count` of at most `max_servers`.
pub(crate) fn check_server_cap(user: UserId, count: u64, max_servers: u64) -> Result<()> {
    if count >= max_servers {
        return Err(StoreError::LimitReached(format!(
            "user {user} is in {count} servers, the most allowed is {max_servers}"
        )));
    }
    Ok(())
}

/// The error of a profile update that broke the email's uniqueness, worded once for both stores
/// (the databases' own messages name indexes, not the address).
pub(crate) fn email_taken(e: StoreError, update: &ProfileUpdate) -> StoreError {
    match (e, &update.email) {
        (StoreError::Conflict(_), Some(Some(email))) => {
            StoreError::Conflict(format!("the email address {email} is another account's"))
        }
        (other, _) => other,
    }
}

/// The record of a session just stored under `id`, as both stores return it.
pub(crate) fn created_session(id: SessionId, session: &NewSession) -> SessionRecord {
    SessionRecord {
        id,
        user_id: session.user_id,
        ip: session.ip.clone(),
        user_agent: session.user_agent.clone(),
        created_at_ms: session.now_ms,
        last_used_at_ms: session.now_ms,
    }
}

/// The record and the `CREATE` delta (seq 1) of a room just created, as both stores return them.
pub(crate) fn created_room(
    id: RoomId,
    name: &str,
    kind: RoomKind,
    owner: UserId,
    owner_name: &str,
    now_ms: i64,
) -> (RoomRecord, DeltaRecord) {
    let room = RoomRecord { id, name: name.into(), kind, last_seq: Seq(1) };
    let delta = DeltaRecord {
        room: id,
        seq: Seq(1),
        kind: RecordKind::CREATE,
        author_id: owner,
        author: owner_name.into(),
        ts_ms: now_ms,
        body: name.into(),
        target: None,
    };
    (room, delta)
}

/// How to open a store; each field applies to one kind of database and is ignored by the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    /// SQLite: how long a write waits for another connection's write lock before failing with
    /// `Unavailable`. Group commits are short; this runs out only when something holds the lock
    /// (a stuck process, a backup tool) or the disk stalls. Default 5 s.
    pub busy_timeout: Duration,
    /// PostgreSQL: how long connecting may take when the URL sets no `connect_timeout`, so an
    /// unreachable server fails the open instead of hanging it. Default 10 s.
    pub connect_timeout: Duration,
    /// SQLite: turn automatic checkpoints off on this connection (`wal_autocheckpoint=0`), so no
    /// commit ever runs one; someone must then call [`Store::checkpoint`] regularly or the WAL
    /// grows without bound. Automatic checkpoints inside a committing worker were measured to push
    /// the p99 of post acknowledgements from ~15 ms to 30-93 ms. Default false.
    pub manual_checkpoints: bool,
    /// Deltas per partition of the log of a room created through this store (see [`partition`]);
    /// a room keeps the size it was created with. Default [`DEFAULT_PARTITION_SIZE`].
    pub partition_size: u64,
    /// The key file of secret rooms: with it, the store opened is a [`secret::SecretStore`]
    /// around the database, which seals the text of secret rooms. Without it (tools, tests of
    /// the bare stores) secret rooms' text is stored as given. Default none.
    pub secret_keys: Option<secret::SecretKeys>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            busy_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            manual_checkpoints: false,
            partition_size: DEFAULT_PARTITION_SIZE,
            secret_keys: None,
        }
    }
}

/// Opens a store from a URL with default [`OpenOptions`]; see [`open_with`].
pub fn open(url: &str) -> Result<Box<dyn Store>> {
    open_with(url, &OpenOptions::default())
}

/// Opens a store from a URL: `sqlite:PATH` (or a bare path) or `postgres://...` /
/// `postgresql://...`, and applies migrations. `Unavailable` when the database cannot be reached
/// or opened right now (try again later), `Config` when the URL or path can never work.
pub fn open_with(url: &str, options: &OpenOptions) -> Result<Box<dyn Store>> {
    let store = open_database(url, options)?;
    Ok(match &options.secret_keys {
        Some(keys) => Box::new(secret::SecretStore::new(store, keys.0.clone())),
        None => store,
    })
}

fn open_database(url: &str, options: &OpenOptions) -> Result<Box<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Box::new(postgres::PgStore::connect_with(url, options)?))
    } else {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        Ok(Box::new(sqlite::SqliteStore::open_with(path, options)?))
    }
}

/// Applies the schema migrations up to and including `version` and no further, without opening a
/// store: a database as an older release left it, for tests that check that later migrations
/// carry existing data over.
#[doc(hidden)]
pub fn migrate_to(url: &str, version: i32) -> Result<()> {
    let target = refinery::Target::Version(version);
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        postgres::migrate_to(url, target)
    } else {
        sqlite::migrate_to(url.strip_prefix("sqlite:").unwrap_or(url), target)
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
fn to_db(v: impl Into<u64>) -> i64 {
    i64::try_from(v.into()).unwrap_or(i64::MAX)
}

/// An id or seq read back; the schema never stores a negative one.
fn from_db<T: From<u64>>(v: i64) -> T {
    T::from(u64::try_from(v).unwrap_or(0))
}

/// The database error under a failed migration, when the migration failed because the database
/// did (so the caller can tell "database down" from "migration broken").
pub(crate) fn migration_cause<E: std::error::Error + 'static>(e: &refinery::Error) -> Option<&E> {
    match e.kind() {
        refinery::error::Kind::Connection(_, cause) => cause.downcast_ref::<E>(),
        _ => None,
    }
}
