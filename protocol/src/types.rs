//! Wire code newtypes (frame types, error codes, delta kinds and room kinds) and id newtypes
//! (rooms, users, seqs).
//!
//! Each code is a transparent integer with named constants rather than a Rust `enum`, so a code
//! this build does not know still decodes, can be reported by value, and never panics (the
//! approach of rustls' `msgs/macros.rs` and quinn's `frame.rs`). Never renumber a constant that
//! has shipped.
//!
//! Ids are newtypes too, so that a room id cannot be passed where a seq or a user id is meant.
//! On the wire each is its bare integer (a postcard varint), exactly as before they were types.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! wire_code {
    ($(#[$meta:meta])* $name:ident($int:ty) { $($(#[$cmeta:meta])* $konst:ident = $val:expr),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $int);

        impl $name {
            $($(#[$cmeta])* pub const $konst: $name = $name($val);)*

            /// The constant's name, or `None` for a code this build does not know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($konst)),)*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => write!(f, "{}::{}", stringify!($name), n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{:#x}", self.0),
                }
            }
        }
    };
}

wire_code! {
    /// The type code in a frame header. Client-to-server codes are below `0x8000`; server replies
    /// are `0x8000..0x9000`; server pushes (request id 0) are `0x9000` and up.
    FrameType(u16) {
        /// Client hello: first frame of every connection.
        HELLO = 0x0001,
        /// Heartbeat request (either direction).
        PING = 0x0002,
        /// Heartbeat answer (either direction).
        PONG = 0x0003,
        /// Create an account and log in.
        REGISTER = 0x0010,
        /// Log in with a password.
        LOGIN = 0x0011,
        /// Log in with a session token.
        RESUME = 0x0012,
        /// Revoke the session token in use.
        LOGOUT = 0x0013,
        /// List the user's live sessions, paged.
        LIST_SESSIONS = 0x0014,
        /// Revoke one or all of the user's sessions.
        REVOKE_SESSIONS = 0x0015,
        /// Who the connection is logged in as.
        WHOAMI = 0x0016,
        /// A user's profile: one's own (with the email) or another user's public one.
        GET_PROFILE = 0x0017,
        /// Change one's email or display name.
        UPDATE_PROFILE = 0x0018,
        /// One page of the user's settings.
        GET_SETTINGS = 0x0019,
        /// Change one setting; the user's other connections are told.
        SET_SETTING = 0x001a,
        /// Create a room.
        CREATE_ROOM = 0x0020,
        /// Join a room.
        JOIN_ROOM = 0x0021,
        /// Leave a room.
        LEAVE_ROOM = 0x0022,
        /// List the rooms the user is in.
        LIST_ROOMS = 0x0023,
        /// List a room's members, paged.
        LIST_MEMBERS = 0x0024,
        /// One room in detail.
        GET_ROOM = 0x0025,
        /// The direct dialog with another user, created on first use.
        OPEN_DIRECT = 0x0026,
        /// Invite, kick, ban, unban, mute, unmute a user or give them a role.
        MODERATE = 0x0027,
        /// Define, redefine or remove a room's role.
        DEFINE_ROLE = 0x0028,
        /// Call signalling: invite to, accept or end a call (a delta in the room).
        CALL = 0x0029,
        /// Create a server (community) with its first channel.
        CREATE_SERVER = 0x0040,
        /// Join a public server.
        JOIN_SERVER = 0x0041,
        /// Leave a server.
        LEAVE_SERVER = 0x0042,
        /// List the servers the user is in, paged.
        LIST_SERVERS = 0x0043,
        /// Create a channel in a server.
        CREATE_CHANNEL = 0x0044,
        /// Give a member of a server a role.
        SET_SERVER_ROLE = 0x0045,
        /// Define or remove a role of a server.
        DEFINE_SERVER_ROLE = 0x0046,
        /// Report what was delivered to and read by the user in a room.
        RECEIPT = 0x0060,
        /// The user's rooms with something unread, paged.
        UNREAD = 0x0061,
        /// The user's recent mentions.
        NOTIFICATIONS = 0x0062,
        /// The user is typing in a room (ephemeral; throttled).
        TYPING = 0x0070,
        /// Set the user's presence (online or away).
        SET_PRESENCE = 0x0071,
        /// Ask for, and follow, the presence of some users (the part of a member list shown).
        WATCH_PRESENCE = 0x0072,
        /// Post a message.
        POST = 0x0030,
        /// Catch up on what was missed, per room.
        SYNC = 0x0031,
        /// One page of a room's history.
        HISTORY = 0x0032,
        /// Edit a message (a new `EDIT` delta).
        EDIT = 0x0033,
        /// Delete a message (a new `DELETE` delta).
        DELETE = 0x0034,
        /// Add or remove a reaction (a new `REACT`/`UNREACT` delta).
        REACT = 0x0035,
        /// Post a reply to a message (a new `REPLY` delta).
        REPLY = 0x0036,
        /// Pin or unpin a message (a new `PIN`/`UNPIN` delta).
        PIN = 0x0037,
        /// One page of a room's messages in their current state.
        VIEW = 0x0038,
        /// One page of a room's whole log, from either end (a new device restoring history).
        RESTORE = 0x0050,
        /// One page of a room's messages that match a query, in their current state.
        SEARCH = 0x0051,
        /// Invite a user to a server, or ban (unban) them from it.
        MODERATE_SERVER = 0x0090,
        /// Start an upload: room, name, size, media type and SHA-256 of the whole file.
        UPLOAD_BEGIN = 0x0080,
        /// Learn where an upload stands (from any connection of its user).
        UPLOAD_RESUME = 0x0081,
        /// Bytes of an upload at an offset.
        UPLOAD_CHUNK = 0x0082,
        /// Finish an upload: verify, store, share in the room.
        UPLOAD_FINISH = 0x0083,
        /// Download a file (or a range of it), streamed as `FILE_CHUNK` pushes.
        DOWNLOAD = 0x0084,
        /// Open a download's window: the bytes received so far.
        DOWNLOAD_ACK = 0x0085,
        /// Copy a message (and its file) into another room.
        FORWARD = 0x0086,

        /// Server hello: the handshake succeeded.
        WELCOME = 0x8001,
        /// Server's heartbeat request.
        SERVER_PING = 0x8002,
        /// Server's heartbeat answer.
        SERVER_PONG = 0x8003,
        /// A request failed.
        ERROR = 0x8004,
        /// Logged in.
        AUTHED = 0x8010,
        /// A request without a result succeeded.
        DONE = 0x8011,
        /// A page of the user's sessions.
        SESSION_LIST = 0x8012,
        /// How many sessions a `REVOKE_SESSIONS` revoked.
        SESSIONS_REVOKED = 0x8013,
        /// Who the connection is logged in as.
        IDENTITY = 0x8014,
        /// A user's profile.
        PROFILE = 0x8015,
        /// A page of the user's settings.
        SETTINGS = 0x8016,
        /// The setting a `SET_SETTING` stored, and the settings version it made.
        SETTING = 0x8017,
        /// One room.
        ROOM_INFO = 0x8020,
        /// A page of the user's rooms.
        ROOM_LIST = 0x8021,
        /// A page of members.
        MEMBER_LIST = 0x8022,
        /// One room in detail.
        ROOM_DETAILS = 0x8023,
        /// One server.
        SERVER_INFO = 0x8040,
        /// A page of the user's servers.
        SERVER_LIST = 0x8041,
        /// A room's read state (the answer to RECEIPT).
        READ_STATE = 0x8060,
        /// A page of rooms with something unread.
        UNREAD_LIST = 0x8061,
        /// The user's recent mentions.
        NOTIFICATION_LIST = 0x8062,
        /// The presence of the users asked for.
        PRESENCE_LIST = 0x8070,
        /// A post is durable.
        POSTED = 0x8030,
        /// A page of deltas (SYNC and HISTORY).
        DELTA_PAGE = 0x8031,
        /// SYNC is caught up.
        SYNC_DONE = 0x8032,
        /// A page of messages in their current state (the answer to `VIEW` and `SEARCH`).
        MESSAGE_PAGE = 0x8033,
        /// A page of a room's log (the answer to `RESTORE`).
        RESTORE_PAGE = 0x8050,
        /// An upload's id and the bytes stored so far (the answer to `UPLOAD_BEGIN`, `UPLOAD_RESUME`).
        UPLOAD_STATE = 0x8080,
        /// A chunk was written (the answer to `UPLOAD_CHUNK`).
        CHUNK_STORED = 0x8081,
        /// An upload is stored and shared (the answer to `UPLOAD_FINISH`).
        FILE_STORED = 0x8082,
        /// What a download streams (the answer to `DOWNLOAD`, before its chunks).
        DOWNLOAD_META = 0x8083,

        /// PUBLISH: a delta committed in one of the user's rooms.
        DELTA = 0x9001,
        /// Another device of the user reported a read: the room's read state now.
        READ_STATE_CHANGED = 0x9020,
        /// Someone is typing in a room (ephemeral: dropped first under back-pressure).
        TYPING_NOW = 0x9030,
        /// A watched user's presence changed (ephemeral).
        PRESENCE_CHANGED = 0x9031,
        /// The server is closing the connection, and why.
        GOODBYE = 0x9002,
        /// One of the user's settings was changed (on another connection of the user).
        SETTING_CHANGED = 0x9010,
        /// Right after a login: the rooms with something unread (the first page of `UNREAD`).
        UNREAD_AT_LOGIN = 0x9050,
        /// Bytes of a download (bulk class: chat frames overtake it).
        FILE_CHUNK = 0x9040,
    }
}

impl FrameType {
    /// Whether this is a server push, which carries request id 0.
    pub fn is_push(self) -> bool {
        self.0 >= 0x9000
    }
}

wire_code! {
    /// Why a request failed (in [`crate::ErrorBody`]) or a connection is closing (in
    /// [`crate::Goodbye`]).
    ErrorCode(u16) {
        /// The frame could not be decoded. For a body that is not a valid encoding of its type the
        /// request fails and the connection goes on; for a length below 6 frame boundaries are lost
        /// and the connection is closed.
        BAD_FRAME = 1,
        /// The frame type is not one this server knows.
        UNKNOWN_TYPE = 2,
        /// The length prefix is over the maximum frame size; the stream cannot continue.
        FRAME_TOO_LARGE = 3,
        /// A frame other than `Hello` arrived before the handshake.
        HANDSHAKE_REQUIRED = 4,
        /// The client's protocol version (or magic) is not supported.
        VERSION_UNSUPPORTED = 5,
        /// The request needs a logged-in user.
        NOT_AUTHENTICATED = 6,
        /// Wrong user name, password or session token.
        AUTH_FAILED = 7,
        /// The user name is taken.
        USER_EXISTS = 8,
        /// No such room (or user).
        NOT_FOUND = 9,
        /// The user is not a member of the room.
        NOT_MEMBER = 10,
        /// A field is out of range (empty name, text too long, ...).
        INVALID_ARGUMENT = 11,
        /// Too many requests; retry later. When the server knows when a retry will be admitted,
        /// the message ends with `(retry_after_ms=N)` ([`crate::ErrorBody::retry_after_ms`]).
        RATE_LIMITED = 12,
        /// The server is overloaded; retry later.
        OVERLOADED = 13,
        /// An internal error (a bug, or a database error that retrying is not expected to fix).
        /// Not retryable; a database that is down is [`ErrorCode::UNAVAILABLE`].
        INTERNAL = 14,
        /// The client fell too far behind; reconnect and SYNC.
        RESYNC_REQUIRED = 15,
        /// The server is shutting down; reconnect later.
        SHUTTING_DOWN = 16,
        /// Nothing was heard from the client within the idle timeout.
        IDLE_TIMEOUT = 17,
        /// Already logged in on this connection.
        ALREADY_AUTHENTICATED = 18,
        /// The database is unreachable or cannot write (restarting, disk full, locked); nothing
        /// was done. Retry after a delay; the connection stays up.
        UNAVAILABLE = 19,
        /// The session was revoked (LOGOUT or REVOKE_SESSIONS on any device); log in again.
        SESSION_REVOKED = 20,
        /// The session reached its idle or absolute lifetime; log in again with a password.
        SESSION_EXPIRED = 21,
        /// A per-user limit was reached (rooms per user); not retryable as is.
        LIMIT_REACHED = 22,
        /// The connection did not log in within the server's deadline.
        AUTH_TIMEOUT = 23,
        /// The connection did not read what the server sent within the write timeout.
        WRITE_TIMEOUT = 24,
        /// A SYNC or HISTORY cursor is past the room's head (the message names the head); the
        /// client's cursor is wrong: SYNC the room again from at most the head.
        CURSOR_AHEAD = 25,
        /// A `HELLO` after the handshake was done; it is ignored and the connection goes on.
        HANDSHAKE_COMPLETE = 26,
        /// The user's role in the room does not allow the request (editing another's message,
        /// deleting without the right, posting while muted, ...). The message names what was
        /// missing.
        FORBIDDEN = 27,
        /// The email address is already another account's (compared without regard to case).
        EMAIL_TAKEN = 40,
        /// An upload chunk's offset is not where the upload stands (RESUME tells where).
        OFFSET_MISMATCH = 45,
        /// The uploaded bytes do not hash to the SHA-256 announced at `UPLOAD_BEGIN` (or their
        /// size differs): the upload's bytes are discarded; begin or resume from 0 again.
        HASH_MISMATCH = 46,
        /// The file is larger than the server's `[files] max_size`.
        FILE_TOO_LARGE = 47,
        /// `UPLOAD_FINISH` before every byte was stored.
        UPLOAD_INCOMPLETE = 48,
    }
}

wire_code! {
    /// What a delta does to its room: the tag of its [`crate::DeltaBody`]. Kinds this build does
    /// not know still decode (as [`crate::DeltaBody::Unknown`]), so new kinds can be added without
    /// breaking older clients.
    DeltaKind(u16) {
        /// The room was created (always seq 1).
        CREATE = 1,
        /// A chat message.
        MESSAGE = 2,
        /// The author joined.
        JOIN = 3,
        /// The author left.
        LEAVE = 4,
        /// The author edited one of their messages: it reads as the new text from now on.
        EDIT = 5,
        /// A message was deleted: it reads as deleted from now on.
        DELETE = 6,
        /// The author reacted to a message with an emoji.
        REACT = 7,
        /// The author took a reaction back.
        UNREACT = 8,
        /// A message that answers an earlier one.
        REPLY = 9,
        /// A message was pinned to the room.
        PIN = 10,
        /// A message was unpinned.
        UNPIN = 11,
        /// The author made a user a member.
        INVITE = 12,
        /// The author removed a member.
        KICK = 13,
        /// The author banned a user (removing them if a member).
        BAN = 14,
        /// The author lifted a user's ban.
        UNBAN = 15,
        /// The author stopped a member from posting.
        MUTE = 16,
        /// The author let a muted member post again.
        UNMUTE = 17,
        /// The author gave a member a role.
        ROLE = 18,
        /// The author defined, redefined or removed a role of the room.
        ROLE_DEFINED = 19,
        /// The author started a call in the room (signalling only; media is elsewhere).
        CALL_INVITE = 20,
        /// The author joined a call.
        CALL_ACCEPT = 21,
        /// The author ended a call (or left it).
        CALL_END = 22,
        /// The author shared a file (a reference: id, name, size, type, SHA-256, caption).
        FILE_SHARED = 23,
    }
}

impl DeltaKind {
    /// The lower-case name used in JSON output (`"message"`, `"join"`, ...).
    pub fn json_name(self) -> String {
        match self.name() {
            Some(n) => n.to_ascii_lowercase(),
            None => format!("unknown_{}", self.0),
        }
    }
}

wire_code! {
    /// A call signalling step (`CALL`).
    CallAction(u8) {
        /// Start a call and invite the room.
        INVITE = 1,
        /// Join a call.
        ACCEPT = 2,
        /// End (or leave) a call.
        END = 3,
    }
}

wire_code! {
    /// Whether a user is around.
    PresenceStatus(u8) {
        /// No live connection.
        OFFLINE = 0,
        /// Connected and active.
        ONLINE = 1,
        /// Connected, but said they are away.
        AWAY = 2,
    }
}

wire_code! {
    /// A moderation step (`MODERATE`).
    ModAction(u8) {
        /// Make the user a member (how one enters an invite-only room).
        INVITE = 1,
        /// Remove a member.
        KICK = 2,
        /// Remove the user and keep them out.
        BAN = 3,
        /// Lift a ban.
        UNBAN = 4,
        /// Stop a member from posting.
        MUTE = 5,
        /// Let them post again.
        UNMUTE = 6,
        /// Give a member the role named in the request.
        SET_ROLE = 7,
    }
}

wire_code! {
    /// What sort of room a room is.
    RoomKind(u8) {
        /// A group room that anyone may join.
        GROUP = 1,
        /// A group room whose deletes are hard: a deleted message's text (and its edits') is
        /// destroyed on disk, not hidden. Invite-only, as `PRIVATE`.
        SECRET = 2,
        /// A direct dialog between exactly two users: one per pair, nobody else can join, and
        /// neither side can leave it.
        DIRECT = 3,
        /// A group room that only those its members invite can enter.
        PRIVATE = 4,
        /// A text channel of a server: its readers are the server's members whose role may.
        CHANNEL = 5,
        /// A voice channel of a server (its text log carries call signalling).
        VOICE = 6,
    }
}

wire_code! {
    /// Which end of a room's log a `RESTORE` reads from.
    RestoreOrder(u8) {
        /// From the room's first delta up: each page continues after the last seq of the one
        /// before.
        OLDEST_FIRST = 0,
        /// From the room's head down: each page continues before the last (smallest) seq of the
        /// one before.
        NEWEST_FIRST = 1,
    }
}

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The bare number.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                $name(v)
            }
        }

        impl From<$name> for u64 {
            fn from(v: $name) -> u64 {
                v.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        // Comparing with a bare number (a literal in a test, a number a user typed) cannot mix
        // two kinds of id up, so it is allowed; arithmetic is not.
        impl PartialEq<u64> for $name {
            fn eq(&self, other: &u64) -> bool {
                self.0 == *other
            }
        }

        impl PartialOrd<u64> for $name {
            fn partial_cmp(&self, other: &u64) -> Option<std::cmp::Ordering> {
                self.0.partial_cmp(other)
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::num::ParseIntError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }
    };
}

id_type! {
    /// A room's id (0 is never a room: "before the first" in paged lists).
    RoomId
}

id_type! {
    /// A user's id (0 is never a user).
    UserId
}

id_type! {
    /// A server's (community's) id (0 is never a server).
    ServerId
}

id_type! {
    /// A position in a room's log: 1, 2, 3, … with no gaps; 0 is "before the first delta" (a
    /// cursor that holds nothing).
    Seq
}

impl Seq {
    /// Before the first delta.
    pub const ZERO: Seq = Seq(0);

    /// The seq after this one.
    pub const fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }

    /// The seq before this one (0 stays 0).
    pub const fn prev(self) -> Seq {
        Seq(self.0.saturating_sub(1))
    }
}
