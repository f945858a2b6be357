//! Frame bodies and the typed frame enums for each direction.
//!
//! Each body is a plain struct whose fields are encoded by postcard in declaration order. Field
//! order is wire format: append new fields only in a new protocol version, never reorder.
//! [`ClientFrame`] is what a client sends, [`ServerFrame`] what a server sends; both map to and
//! from [`RawFrame`]s through the code table below, which `docs/protocol.md` repeats.

pub use crate::delta::{
    CallBody, CreateBody, DeltaBody, EditBody, FileBody, MemberBody, MessageBody, ReactBody, ReplyBody, RoleBody,
    RoleDefinedBody, TargetBody,
};
use crate::frame::{self, decode_body, DecodeError, EncodeError, RawFrame};
use crate::perm::Permissions;
use crate::types::{
    CallAction, ErrorCode, FrameType, ModAction, PresenceStatus, RestoreOrder, RoomId, RoomKind, Seq, ServerId, UserId,
};
use crate::DeltaKind;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// `HELLO`: the first frame of every connection.
///
/// Its first two fields are fixed for every version, past and future: a server reads them alone
/// first, so that it can refuse any client (older versions had other fields after them) with a
/// message that names both sides' versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`crate::MAGIC`] (`b"CHIM"`), four raw bytes.
    pub magic: [u8; 4],
    /// The newest protocol version the client speaks (in versions 1 and 2 the only one).
    pub max_version: u16,
    /// The oldest protocol version the client speaks.
    pub min_version: u16,
    /// The client program's name, for logs (`"chime"`).
    pub client_name: String,
    /// The client program's version, for logs.
    pub client_version: String,
}

/// The part of `HELLO` that every version shares (see [`Hello`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloPrefix {
    /// The magic.
    pub magic: [u8; 4],
    /// The newest version the client speaks.
    pub max_version: u16,
}

impl HelloPrefix {
    /// Reads the prefix of a `HELLO` body of any version; `None` when even that does not decode.
    pub fn peek(body: &[u8]) -> Option<HelloPrefix> {
        postcard::take_from_bytes(body).ok().map(|(prefix, _rest)| prefix)
    }
}

/// `WELCOME`: the server accepted the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the server will speak on this connection: the newest both speak.
    pub protocol_version: u16,
    /// The oldest version the server speaks.
    pub min_version: u16,
    /// The newest version the server speaks.
    pub max_version: u16,
    /// The server program's name (`"chimed"`).
    pub server_name: String,
    /// The server program's version.
    pub server_version: String,
    /// The limits a client must plan for.
    pub limits: Limits,
}

/// The server's limits that a client must plan for, announced in `WELCOME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The largest `length` field the server accepts (and sends).
    pub max_frame: u32,
    /// How often, in seconds, the server pings a silent connection; one silent for about three
    /// intervals is closed.
    pub heartbeat_secs: u32,
    /// Longest message text, in bytes.
    pub max_text: u32,
    /// Longest idempotency key, in bytes.
    pub max_key: u32,
    /// Longest room name, in characters.
    pub max_room_name: u32,
    /// Longest user name, in characters.
    pub max_user_name: u32,
    /// Shortest password accepted at registration, in bytes.
    pub min_password: u32,
    /// Longest password, in bytes.
    pub max_password: u32,
    /// Requests one connection may have in flight; further frames wait unread (backpressure).
    pub max_in_flight: u32,
    /// Frames that may follow a login still being checked; further ones wait unread.
    pub max_queued_during_login: u32,
    /// The page size used when a request asks for 0.
    pub default_page: u32,
    /// The largest page; asking for more gives this many.
    pub max_page: u32,
    /// Most rooms in one SYNC.
    pub max_sync_rooms: u32,
}

impl Default for Limits {
    /// The reference server's limits when its operator changed none.
    fn default() -> Limits {
        Limits {
            max_frame: crate::DEFAULT_MAX_FRAME,
            heartbeat_secs: 30,
            max_text: 16 * 1024,
            max_key: 64,
            max_room_name: 100,
            max_user_name: 32,
            min_password: 8,
            max_password: 1024,
            max_in_flight: 256,
            max_queued_during_login: 64,
            default_page: 500,
            max_page: 1000,
            max_sync_rooms: 1000,
        }
    }
}

/// `PING` / `PONG` in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Any value; the answer echoes it.
    pub nonce: u64,
}

/// `ERROR`: a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub code: ErrorCode,
    /// A human-readable message.
    pub message: String,
    /// Whether the same request may succeed if retried later.
    pub retryable: bool,
}

/// `GOODBYE`: the server closes the connection after this push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why.
    pub code: ErrorCode,
    /// A human-readable message.
    pub message: String,
    /// Whether the client should SYNC after reconnecting because pushes were dropped.
    pub resync: bool,
}

/// `REGISTER` and `LOGIN`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password, in clear (the stream is TLS).
    pub password: String,
    /// The client's user agent, stored with the session.
    pub user_agent: String,
}

/// `RESUME`: log in with a session token from an earlier `AUTHED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The session token.
    pub token: String,
    /// The client's user agent.
    pub user_agent: String,
}

/// `AUTHED`: logged in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authed {
    /// The user's id.
    pub user_id: UserId,
    /// The user's name.
    pub user: String,
    /// A new session token (on `REGISTER` and `LOGIN`); `None` on `RESUME`.
    pub token: Option<String>,
}

/// `IDENTITY`: who the connection is logged in as (the answer to `WHOAMI`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The user's id.
    pub user_id: UserId,
    /// The user's name.
    pub user: String,
    /// The session the connection uses (as `SESSION_LIST` names it).
    pub session: u64,
}

/// `GET_PROFILE`: a user's profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetProfile {
    /// The user, by name; `None` for the asking user. Naming oneself is the same as `None`.
    pub user: Option<String>,
}

/// `UPDATE_PROFILE`: changes the asking user's email and display name. A field that is `None` is
/// left as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateProfile {
    /// `None`: unchanged; `Some(None)`: remove the email; `Some(Some(address))`: set it.
    pub email: Option<Option<String>>,
    /// `None`: unchanged; `Some(name)`: the new display name (trimmed by the server).
    pub display_name: Option<String>,
}

/// `PROFILE`: a user's profile (the answer to `GET_PROFILE` and `UPDATE_PROFILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The user's id.
    pub user_id: UserId,
    /// The user's name.
    pub user: String,
    /// The user's email: only ever in the user's own profile; `None` there when there is none,
    /// and always `None` in another user's.
    pub email: Option<String>,
    /// The name shown for the user: the one they chose, else their user name.
    pub display_name: String,
}

/// `GET_SETTINGS`: one page of the asking user's settings. The account-wide settings come on the
/// first page (`after_room` 0), then the rooms whose notification level is not the default, by
/// room id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GetSettings {
    /// Start after this room id (0 for the first page).
    pub after_room: RoomId,
    /// Rooms per page; 0 means the server's default (500); the server caps it at 1,000.
    pub limit: u32,
}

/// One setting: a key and its value, both text (`docs/protocol.md` lists the keys and values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    /// The key (`"media.auto_load"`, `"notify.300"`, ...).
    pub key: String,
    /// The value (`"true"`, `"mentions"`, ...).
    pub value: String,
}

/// `SETTINGS`: one page of the user's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The user's settings version when this page was read: it grows with every change.
    pub version: u64,
    /// This page's settings: on the first page every account-wide setting (with its default when
    /// it was never set), then per-room ones.
    pub entries: Vec<Setting>,
    /// Pass as `after_room` for the next page; `None` on the last page.
    pub next_after: Option<RoomId>,
}

/// `SET_SETTING`: changes one of the asking user's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetSetting {
    /// The key.
    pub key: String,
    /// The new value.
    pub value: String,
}

/// `SETTING` (the answer to `SET_SETTING`) and the `SETTING_CHANGED` push: a setting as stored,
/// and the settings version its change made. The push goes to every other connection of the
/// user; two changes racing may arrive in either order, so a client keeps a change only when its
/// version is above the one it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingChanged {
    /// The user's settings version after the change.
    pub version: u64,
    /// The key.
    pub key: String,
    /// The value, as the server spells it.
    pub value: String,
}

/// A body with no fields (`LOGOUT`, `DONE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Empty {}

/// `CREATE_ROOM`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRoom {
    /// The room's name.
    pub name: String,
    /// What sort of room.
    pub kind: RoomKind,
}

/// `JOIN_ROOM`, `LEAVE_ROOM` and `GET_ROOM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRef {
    /// The room's id.
    pub room: RoomId,
}

/// `OPEN_DIRECT`: the direct dialog with `user`, created on first use by whichever side asks
/// first; the answer is `ROOM_INFO`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenDirect {
    /// The other user's name.
    pub user: String,
}

/// `MODERATE`: one moderation step on a user of a room; the answer is `POSTED` with the seq of
/// its delta, or (nothing to change) the room's head with `duplicate` set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moderate {
    /// The room's id.
    pub room: RoomId,
    /// The user's name.
    pub user: String,
    /// What to do.
    pub action: ModAction,
    /// For `SET_ROLE`: the role; empty otherwise.
    pub role: String,
}

/// `CALL`: one call signalling step in a room, answered `POSTED` with its delta's seq (needs
/// `post`). An INVITE starts a call (its seq names the call); ACCEPT and END name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// The room's id.
    pub room: RoomId,
    /// What to do.
    pub action: CallAction,
    /// The call (the seq of its CALL_INVITE); 0 for INVITE.
    pub call: Seq,
    /// Opaque media signalling (SDP), at most 8 KiB.
    pub data: String,
}

/// `DEFINE_ROLE`: define or redefine a role of the room (`member` is the room-wide default), or
/// remove it; the answer is `POSTED` with the seq of its `ROLE_DEFINED` delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefineRole {
    /// The room's id.
    pub room: RoomId,
    /// The role's name.
    pub name: String,
    /// What it allows; none removes the definition.
    pub permissions: Option<Permissions>,
}

/// `CREATE_SERVER`: a community; its creator becomes its owner and it starts with a channel
/// named `general`. The answer is `SERVER_INFO`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateServer {
    /// The name.
    pub name: String,
    /// What it is about.
    pub description: String,
    /// Whether anyone may join it by id (else nobody can join yet; invitations come later).
    pub public: bool,
}

/// `JOIN_SERVER`, `LEAVE_SERVER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRef {
    /// The server's id.
    pub server: ServerId,
}

/// One server as the server describes it to one of its (would-be) members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The id.
    pub server: ServerId,
    /// The name.
    pub name: String,
    /// What it is about.
    pub description: String,
    /// Whether anyone may join it by id.
    pub public: bool,
    /// Who owns it.
    pub owner: UserId,
    /// How many members it has.
    pub members: u64,
    /// How many it may have.
    pub member_cap: u64,
    /// The asking user's role (empty when not a member).
    pub role: String,
    /// The channels the asking user may read (on CREATE_SERVER and JOIN_SERVER; empty in lists).
    pub channels: Vec<RoomInfo>,
}

/// `LIST_SERVERS`: one page of the user's servers, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ListServers {
    /// Start after this server id (0 for the first page).
    pub after_server: ServerId,
    /// Page size; 0 means the server's default; capped.
    pub limit: u32,
}

/// `SERVER_LIST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerList {
    /// This page, by id.
    pub servers: Vec<ServerInfo>,
    /// Pass as `after_server` for the next page; `None` on the last page.
    pub next_after: Option<ServerId>,
}

/// `CREATE_CHANNEL`: a text or voice channel of a server (needs `manage_channels`); the answer is
/// `ROOM_INFO`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateChannel {
    /// The server's id.
    pub server: ServerId,
    /// The channel's name.
    pub name: String,
    /// A voice channel (its log carries call signalling) rather than a text one.
    pub voice: bool,
    /// Roles that may read it; empty: every member. Owners and admins always may.
    pub read_roles: Vec<String>,
    /// Roles that may post in it; empty: everyone who may read. Owners and admins always may.
    pub post_roles: Vec<String>,
}

/// `SET_SERVER_ROLE`: give a member of a server a role; the answer is `DONE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetServerRole {
    /// The server's id.
    pub server: ServerId,
    /// The member's name.
    pub user: String,
    /// The role: owner, admin, moderator, member or one the server defined.
    pub role: String,
}

/// `MODERATE_SERVER`: `INVITE` a user to a server (the way into a private one: the invited user
/// then joins with `JOIN_SERVER`), `BAN` them (removed, and refused by `JOIN_SERVER` until
/// unbanned) or `UNBAN` them. The answer is `DONE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModerateServer {
    /// The server's id.
    pub server: ServerId,
    /// The user's name.
    pub user: String,
    /// `INVITE`, `BAN` or `UNBAN`; other actions are refused `INVALID_ARGUMENT`.
    pub action: ModAction,
}

/// `DEFINE_SERVER_ROLE`: define (or with none, remove) a role of a server; `member` redefines
/// what every plain member may do. The answer is `DONE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefineServerRole {
    /// The server's id.
    pub server: ServerId,
    /// The role's name.
    pub name: String,
    /// What it allows; none removes it.
    pub permissions: Option<Permissions>,
}

/// `RECEIPT`: the user's devices have been delivered up to `delivered` and the user read up to
/// `read` in `room`. Both only move forward and are clamped to the head; the answer is
/// `READ_STATE`, and the user's other connections get it as a `READ_STATE_CHANGED` push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The room's id.
    pub room: RoomId,
    /// Delivered up to here (0: no change).
    pub delivered: Seq,
    /// Read up to here (0: no change).
    pub read: Seq,
}

/// A room's read state for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadState {
    /// The room's id.
    pub room: RoomId,
    /// Its head.
    pub head: Seq,
    /// The last seq delivered to one of the user's devices.
    pub delivered: Seq,
    /// The last seq the user read.
    pub read: Seq,
    /// Messages by others after `read` (counting stops at 10,000).
    pub unread: u64,
    /// Mentions of the user after `read`.
    pub mentions: u64,
}

/// `UNREAD`: one page of the user's rooms that have unread messages or mentions, by room id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Unread {
    /// Start after this room id (0 for the first page).
    pub after_room: RoomId,
    /// Page size; 0: the server's default; capped.
    pub limit: u32,
}

/// `UNREAD_LIST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadList {
    /// Rooms with something unread, by id.
    pub rooms: Vec<ReadState>,
    /// Pass as `after_room` for the next page; `None` on the last page.
    pub next_after: Option<RoomId>,
}

/// `NOTIFICATIONS`: the user's most recent mentions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notifications {
    /// How many; 0: the server's default; capped.
    pub limit: u32,
}

/// One mention of the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The room's id.
    pub room: RoomId,
    /// The message's seq.
    pub seq: Seq,
    /// Its author.
    pub author: String,
    /// When it was posted.
    pub ts_ms: i64,
    /// Its text now; none once deleted.
    pub text: Option<String>,
    /// Whether the user has read up to it.
    pub read: bool,
}

/// `NOTIFICATION_LIST`: mentions, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationList {
    /// The mentions.
    pub notifications: Vec<Notification>,
}

/// `TYPING`: the user is typing in `room`. Answered `DONE`; the room's other online readers get a
/// `TYPING_NOW` push, at most one per user and room every 3 seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Typing {
    /// The room's id.
    pub room: RoomId,
}

/// `TYPING_NOW`: a push saying `user` is typing in `room`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypingNow {
    /// The room's id.
    pub room: RoomId,
    /// Who is typing.
    pub user_id: UserId,
    /// Their name.
    pub user: String,
}

/// `SET_PRESENCE`: online or away (offline is having no connection). Answered `DONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPresence {
    /// `ONLINE` or `AWAY`.
    pub status: PresenceStatus,
}

/// `WATCH_PRESENCE`: the presence of these users now (`PRESENCE_LIST`), and `PRESENCE_CHANGED`
/// pushes when it changes, until the next WATCH_PRESENCE of the connection replaces the set (at
/// most 500 users). Presence is never broadcast to a whole room: a client watches the members it
/// shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchPresence {
    /// The users.
    pub users: Vec<UserId>,
}

/// One user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// The user.
    pub user_id: UserId,
    /// Their status.
    pub status: PresenceStatus,
    /// When they were last connected, Unix milliseconds (now when connected; 0 when the server
    /// has not seen them since it started).
    pub last_seen_ms: i64,
}

/// `PRESENCE_LIST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceList {
    /// One entry per user asked for, in the order asked.
    pub entries: Vec<PresenceEntry>,
}

/// `LIST_MEMBERS`: one page of members, ordered by user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMembers {
    /// The room's id.
    pub room: RoomId,
    /// Start after this user id (0 for the first page).
    pub after_user: UserId,
    /// Page size; the server caps it.
    pub limit: u32,
}

/// One room as the server describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    /// The room's id.
    pub room: RoomId,
    /// The room's name.
    pub name: String,
    /// What sort of room.
    pub kind: RoomKind,
    /// The seq of the room's latest delta.
    pub head_seq: Seq,
}

/// `ROOM_DETAILS`: one room in more detail (the answer to `GET_ROOM`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomDetails {
    /// The room's id, name, kind and head.
    pub info: RoomInfo,
    /// How many members it has.
    pub members: u64,
    /// The asking user's role in it (`"owner"`, `"member"`).
    pub role: String,
}

/// `LIST_ROOMS`: one page of the rooms the user is in, ordered by room id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ListRooms {
    /// Start after this room id (0 for the first page).
    pub after_room: RoomId,
    /// Page size; 0 means the server's default (500); the server caps it at 1,000.
    pub limit: u32,
}

/// `ROOM_LIST`: one page of the user's rooms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomList {
    /// The rooms of this page, by id.
    pub rooms: Vec<RoomInfo>,
    /// Pass as `after_room` for the next page; `None` on the last page.
    pub next_after: Option<RoomId>,
}

/// `LIST_SESSIONS`: one page of the user's live sessions (devices), ordered by session id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ListSessions {
    /// Start after this session id (0 for the first page).
    pub after_session: u64,
    /// Page size; 0 means the server's default (500); the server caps it at 1,000.
    pub limit: u32,
}

/// One live session of the user, as `SESSION_LIST` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session's id (what `REVOKE_SESSIONS` takes).
    pub session: u64,
    /// The client's address when the session was created.
    pub ip: String,
    /// The user agent the client gave when the session was created.
    pub user_agent: String,
    /// When the session was created (a password login or registration), Unix milliseconds.
    pub created_ms: i64,
    /// When the session was last used: now for a session with a live connection, else the last
    /// login, resume or disconnect, Unix milliseconds.
    pub last_seen_ms: i64,
    /// Whether this is the session of the connection asking.
    pub current: bool,
}

/// `SESSION_LIST`: one page of the user's live sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionList {
    /// The sessions of this page, by id.
    pub sessions: Vec<SessionInfo>,
    /// Pass as `after_session` for the next page; `None` on the last page.
    pub next_after: Option<u64>,
}

/// `REVOKE_SESSIONS`: log a device out, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeSessions {
    /// The session to revoke; `None` revokes every session of the user, this one included.
    pub session: Option<u64>,
}

/// `SESSIONS_REVOKED`: how many sessions were revoked. Every connection of a revoked session is
/// closed at once (GOODBYE `SESSION_REVOKED`), the asking one too if its own session was among them,
/// right after this reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionsRevoked {
    /// Sessions revoked (0 when the id was not a live session of the user).
    pub count: u32,
}

/// One member of a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The user's id.
    pub user_id: UserId,
    /// The user's name.
    pub user: String,
    /// The member's role (`"owner"`, `"member"`).
    pub role: String,
}

/// `MEMBER_LIST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberList {
    /// The room's id.
    pub room: RoomId,
    /// This page, by user id.
    pub members: Vec<MemberInfo>,
    /// Pass as `after_user` for the next page; `None` on the last page.
    pub next_after: Option<UserId>,
}

/// `POST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Post {
    /// The room's id.
    pub room: RoomId,
    /// A key the client chooses per message (a UUID, say). Posting again with the same key in the
    /// same room returns the first post's seq and writes nothing.
    pub idempotency_key: String,
    /// The message.
    pub text: String,
}

/// `POSTED`: the post is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posted {
    /// The room's id.
    pub room: RoomId,
    /// The delta's seq.
    pub seq: Seq,
    /// Commit time, Unix milliseconds.
    pub ts_ms: i64,
    /// True when this is a retry of an earlier post with the same key.
    pub duplicate: bool,
}

/// `EDIT`: change the text of one of the user's messages. The answer is `POSTED` with the
/// `EDIT` delta's seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edit {
    /// The room's id.
    pub room: RoomId,
    /// The message (a `MESSAGE` or `REPLY` delta).
    pub target: Seq,
    /// As for `POST`: a retry with the same key writes nothing and returns the first seq.
    pub idempotency_key: String,
    /// The new text.
    pub text: String,
}

/// `DELETE`: delete a message (one's own, or anyone's with the right to). The answer is
/// `POSTED` with the `DELETE` delta's seq; deleting a deleted message answers the first delete's
/// seq with `duplicate` set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteMessage {
    /// The room's id.
    pub room: RoomId,
    /// The message.
    pub target: Seq,
}

/// `REACT`: add (or with `remove`, take back) the user's reaction to a message. One reaction
/// per user per emoji: adding one already there answers the seq that added it with `duplicate`
/// set; removing one that is not there is `NOT_FOUND`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct React {
    /// The room's id.
    pub room: RoomId,
    /// The message.
    pub target: Seq,
    /// The emoji.
    pub emoji: String,
    /// Take the reaction back instead.
    pub remove: bool,
}

/// `REPLY`: post a message that answers an earlier one. As `POST` otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The room's id.
    pub room: RoomId,
    /// The message answered.
    pub reply_to: Seq,
    /// As for `POST`.
    pub idempotency_key: String,
    /// The reply's text.
    pub text: String,
}

/// `PIN`: pin (or with `remove`, unpin) a message. Pinning a pinned message answers the seq
/// that pinned it with `duplicate` set; unpinning one that is not pinned is `NOT_FOUND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The room's id.
    pub room: RoomId,
    /// The message.
    pub target: Seq,
    /// Unpin instead.
    pub remove: bool,
}

/// `VIEW`: one page of a room's messages in their current state, newest first: messages with
/// seq < `before` (0: from the newest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The room's id.
    pub room: RoomId,
    /// Messages before this seq; 0 for the newest.
    pub before: Seq,
    /// At most this many; 0 means the server's default, and the server caps it.
    pub limit: u32,
}

/// One reaction on a message and how many members made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionCount {
    /// The emoji.
    pub emoji: String,
    /// How many members reacted with it.
    pub count: u64,
    /// Whether the asking user is one of them.
    pub mine: bool,
}

/// A message in its current state: its latest text, whether it was edited or deleted, its
/// reactions, what it answers, whether it is pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// The message's own delta (`MESSAGE` or `REPLY`).
    pub seq: Seq,
    /// The author's id.
    pub author_id: UserId,
    /// The author's name.
    pub author: String,
    /// When it was posted, Unix milliseconds.
    pub ts_ms: i64,
    /// The latest text; `None` once deleted.
    pub text: Option<String>,
    /// When it was last edited, Unix milliseconds; `None` if never.
    pub edited_ms: Option<i64>,
    /// Whether it was deleted.
    pub deleted: bool,
    /// The message it answers.
    pub reply_to: Option<Seq>,
    /// Whether it is pinned.
    pub pinned: bool,
    /// Its reactions, by emoji.
    pub reactions: Vec<ReactionCount>,
}

/// `MESSAGE_PAGE`: the answer to `VIEW`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePage {
    /// The room's id.
    pub room: RoomId,
    /// The messages, newest first.
    pub messages: Vec<MessageView>,
    /// Pass as `before` for the next (older) page; `None` when there are no older messages.
    pub next_before: Option<Seq>,
}

/// `SEARCH`: one page of a room's messages whose current text has every word of `query`,
/// newest first, in their current state; the answer is `MESSAGE_PAGE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Search {
    /// The room's id.
    pub room: RoomId,
    /// Plain words, all of which a message must contain (case-insensitive, whole words). Any
    /// character that is not a letter or a digit separates words; nothing is search syntax.
    pub query: String,
    /// Messages before this seq; 0 for the newest.
    pub before: Seq,
    /// At most this many; 0 means the server's default, and the server caps it.
    pub limit: u32,
}

/// `RESTORE`: one page of a room's whole log, from the oldest delta up or from the head down,
/// for a client that holds none of it (a new or reinstalled device). The answer is
/// `RESTORE_PAGE`; the server rate-limits these per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restore {
    /// The room's id.
    pub room: RoomId,
    /// Which end to read from.
    pub order: RestoreOrder,
    /// Oldest first: deltas after this seq (0: from the first). Newest first: deltas before this
    /// seq (0: from the head). A page's `next` is the cursor for the page after it.
    pub cursor: Seq,
    /// At most this many deltas; 0 means the server's default, and the server caps it.
    pub limit: u32,
}

/// `RESTORE_PAGE`: one page of a room's log, contiguous, in the order asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePage {
    /// The room's id.
    pub room: RoomId,
    /// The order of `deltas`, as asked.
    pub order: RestoreOrder,
    /// The room's head when the page was read: what an oldest-first restore reads up to, and
    /// where a newest-first one started (live pushes and SYNC carry on from there).
    pub head: Seq,
    /// Deltas with consecutive seqs, ascending (oldest first) or descending (newest first).
    pub deltas: Vec<Delta>,
    /// The cursor for the next page; `None` when this page reached the end (the head, or seq 1).
    pub next: Option<Seq>,
}

/// A per-room position: "I have everything up to and including `seq`".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCursor {
    /// The room's id.
    pub room: RoomId,
    /// The last seq held (0 for none).
    pub seq: Seq,
}

/// `SYNC`: stream what is missing after each cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sync {
    /// One cursor per room to catch up.
    pub rooms: Vec<RoomCursor>,
    /// Deltas per page; the server caps it.
    pub page_size: u32,
}

/// `HISTORY`: one page of a room's deltas after a seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The room's id.
    pub room: RoomId,
    /// Deltas after this seq.
    pub after: Seq,
    /// At most this many; the server caps it.
    pub limit: u32,
}

/// One immutable change in a room's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The room's id.
    pub room: RoomId,
    /// Position in the room's log: 1, 2, 3, ... with no gaps.
    pub seq: Seq,
    /// The author's user id.
    pub author_id: UserId,
    /// The author's user name.
    pub author: String,
    /// Commit time, Unix milliseconds.
    pub ts_ms: i64,
    /// What the delta does, tagged by kind.
    pub body: DeltaBody,
}

impl Delta {
    /// The delta's kind.
    pub fn kind(&self) -> DeltaKind {
        self.body.kind()
    }

    /// The text a person reads for it (a message, a created room's name), or `""`.
    pub fn text(&self) -> &str {
        self.body.text().unwrap_or("")
    }
}

/// `DELTA_PAGE`: one page of a SYNC or a HISTORY reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaPage {
    /// The room's id.
    pub room: RoomId,
    /// Deltas in seq order, contiguous.
    pub deltas: Vec<Delta>,
    /// Whether more deltas follow (for SYNC, another page of this room comes next on the same
    /// request id; for HISTORY, ask again from `resume_after`).
    pub more: bool,
    /// The last seq covered by this page (the cursor to resume from).
    pub resume_after: Seq,
}

/// `SYNC_DONE`: every room in the SYNC is caught up; live pushes continue from each head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncDone {
    /// Per room, the last seq delivered on this connection.
    pub heads: Vec<RoomCursor>,
}

/// `UPLOAD_BEGIN`: start uploading a file to share in a room (needs `post` there). Answered
/// `UPLOAD_STATE`; refused `FILE_TOO_LARGE` over the server's `max_size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadBegin {
    /// The room the file will be shared in.
    pub room: RoomId,
    /// The file's visible name (1 to 255 bytes, no '/' or NUL).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type (at most 127 bytes; may be empty).
    pub media_type: String,
    /// The SHA-256 of the whole file, checked at `UPLOAD_FINISH`.
    pub sha256: [u8; 32],
}

/// `UPLOAD_RESUME`: where an upload of the user stands, from any of the user's connections
/// (after a reconnect too). Answered `UPLOAD_STATE`; the upload may then be continued on this
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadResume {
    /// The upload's id.
    pub upload: u64,
}

/// `UPLOAD_STATE`: an upload's id and how much of it the server holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    /// The upload's id.
    pub upload: u64,
    /// Bytes stored so far: the next chunk starts here.
    pub offset: u64,
    /// The file's size.
    pub size: u64,
    /// The largest chunk the server takes.
    pub chunk_size: u32,
    /// Chunks the client may have unacknowledged at once.
    pub window: u32,
}

/// `UPLOAD_CHUNK`: bytes of an upload, at the offset where it stands. Answered `CHUNK_STORED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadChunk {
    /// The upload's id.
    pub upload: u64,
    /// Where the bytes go: must equal the bytes stored so far (`OFFSET_MISMATCH` otherwise).
    pub offset: u64,
    /// The bytes (1 to `chunk_size`).
    #[serde(with = "crate::delta::bytes_field")]
    pub data: Vec<u8>,
}

/// `CHUNK_STORED`: the upload now holds `offset` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkStored {
    /// The upload's id.
    pub upload: u64,
    /// Bytes stored so far.
    pub offset: u64,
}

/// `UPLOAD_FINISH`: every byte is sent; verify, store and share. Answered `FILE_STORED` once the
/// content is fsynced and the file record and its `FILE_SHARED` delta are committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadFinish {
    /// The upload's id.
    pub upload: u64,
    /// Text shown with the file (at most the largest message text); may be empty.
    pub caption: String,
}

/// `FILE_STORED`: the file is stored and shared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStored {
    /// The new file record's id.
    pub file: u64,
    /// The room.
    pub room: RoomId,
    /// The seq of its `FILE_SHARED` delta.
    pub seq: Seq,
    /// The SHA-256 the server verified.
    pub sha256: [u8; 32],
}

/// `DOWNLOAD`: stream a file's bytes from `offset` (to the end, or `length` bytes when not 0).
/// Answered `DOWNLOAD_META`, then `FILE_CHUNK` pushes naming this request id, in order, while the
/// window allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Download {
    /// The file record's id.
    pub file: u64,
    /// The first byte wanted.
    pub offset: u64,
    /// Bytes wanted; 0: to the end.
    pub length: u64,
}

/// `DOWNLOAD_META`: the file, and the range that follows as `FILE_CHUNK`s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadMeta {
    /// The file record's id.
    pub file: u64,
    /// Its visible name.
    pub name: String,
    /// Its whole size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// The SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// The first byte streamed.
    pub offset: u64,
    /// Bytes streamed.
    pub length: u64,
    /// Bytes the server sends beyond the last `DOWNLOAD_ACK`ed offset.
    pub window: u32,
}

/// `DOWNLOAD_ACK`: the client received a download's bytes up to `received` (an absolute file
/// offset), which opens its window again. Not answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadAck {
    /// The request id of the `DOWNLOAD`.
    pub download: u32,
    /// Bytes received up to this file offset.
    pub received: u64,
}

/// `FILE_CHUNK` (push): bytes of a download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChunk {
    /// The request id of the `DOWNLOAD`.
    pub download: u32,
    /// The file offset of the first byte.
    pub offset: u64,
    /// The bytes; the download is complete with the chunk that reaches its end.
    #[serde(with = "crate::delta::bytes_field")]
    pub data: Vec<u8>,
}

/// `FORWARD`: copy a message (a `MESSAGE`, `REPLY`'s text, or a `FILE_SHARED`) of a room the user
/// reads into a room where the user may post; answered `POSTED` with the new delta's seq in the
/// target room. A forwarded file is a new file record on the same content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// The room the message is in.
    pub room: RoomId,
    /// The message's seq.
    pub seq: Seq,
    /// The room it is copied to.
    pub to_room: RoomId,
}

macro_rules! frame_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident($body:ty) = $code:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant($body),)*
        }

        impl $name {
            /// The frame type code of this frame.
            pub fn frame_type(&self) -> FrameType {
                match self {
                    $($name::$variant(_) => FrameType::$code,)*
                }
            }

            /// Decodes a raw frame's body by its type code.
            pub fn decode(raw: &RawFrame) -> Result<Self, DecodeError> {
                match raw.ty {
                    $(FrameType::$code => Ok($name::$variant(decode_body(raw.ty, &raw.body)?)),)*
                    other => Err(DecodeError::UnknownType(other)),
                }
            }

            /// Encodes the frame with its header; refuses a frame over [`frame::MAX_FRAME`].
            pub fn encode(&self, request_id: u32) -> Result<Bytes, EncodeError> {
                match self {
                    $($name::$variant(body) => frame::encode(FrameType::$code, request_id, body),)*
                }
            }

            /// Appends the encoded frame to `out`; on error `out` is unchanged.
            pub fn encode_into(&self, out: &mut Vec<u8>, request_id: u32) -> Result<(), EncodeError> {
                match self {
                    $($name::$variant(body) => frame::encode_into(out, FrameType::$code, request_id, body),)*
                }
            }
        }
    };
}

frame_enum! {
    /// A frame a client sends.
    ClientFrame {
        /// See [`Hello`].
        Hello(Hello) = HELLO,
        /// Heartbeat.
        Ping(Ping) = PING,
        /// Heartbeat answer.
        Pong(Ping) = PONG,
        /// Create an account and log in.
        Register(Credentials) = REGISTER,
        /// Log in.
        Login(Credentials) = LOGIN,
        /// Log in with a token.
        Resume(Resume) = RESUME,
        /// Revoke the token.
        Logout(Empty) = LOGOUT,
        /// List my sessions.
        ListSessions(ListSessions) = LIST_SESSIONS,
        /// Revoke one or all of my sessions.
        RevokeSessions(RevokeSessions) = REVOKE_SESSIONS,
        /// Who am I logged in as.
        Whoami(Empty) = WHOAMI,
        /// A user's profile.
        GetProfile(GetProfile) = GET_PROFILE,
        /// Change my email or display name.
        UpdateProfile(UpdateProfile) = UPDATE_PROFILE,
        /// A page of my settings.
        GetSettings(GetSettings) = GET_SETTINGS,
        /// Change one of my settings.
        SetSetting(SetSetting) = SET_SETTING,
        /// Create a room.
        CreateRoom(CreateRoom) = CREATE_ROOM,
        /// Join a room.
        JoinRoom(RoomRef) = JOIN_ROOM,
        /// Leave a room.
        LeaveRoom(RoomRef) = LEAVE_ROOM,
        /// List my rooms.
        ListRooms(ListRooms) = LIST_ROOMS,
        /// List members.
        ListMembers(ListMembers) = LIST_MEMBERS,
        /// One room in detail.
        GetRoom(RoomRef) = GET_ROOM,
        /// The direct dialog with a user.
        OpenDirect(OpenDirect) = OPEN_DIRECT,
        /// Moderate a user.
        Moderate(Moderate) = MODERATE,
        /// Define a role.
        DefineRole(DefineRole) = DEFINE_ROLE,
        /// Call signalling.
        Call(Call) = CALL,
        /// Typing.
        Typing(Typing) = TYPING,
        /// Set presence.
        SetPresence(SetPresence) = SET_PRESENCE,
        /// Watch presence.
        WatchPresence(WatchPresence) = WATCH_PRESENCE,
        /// Report delivery and reading.
        Receipt(Receipt) = RECEIPT,
        /// Rooms with something unread.
        Unread(Unread) = UNREAD,
        /// Recent mentions.
        Notifications(Notifications) = NOTIFICATIONS,
        /// Create a server.
        CreateServer(CreateServer) = CREATE_SERVER,
        /// Join a server.
        JoinServer(ServerRef) = JOIN_SERVER,
        /// Leave a server.
        LeaveServer(ServerRef) = LEAVE_SERVER,
        /// List my servers.
        ListServers(ListServers) = LIST_SERVERS,
        /// Create a channel.
        CreateChannel(CreateChannel) = CREATE_CHANNEL,
        /// Give a server role.
        SetServerRole(SetServerRole) = SET_SERVER_ROLE,
        /// Define a server role.
        DefineServerRole(DefineServerRole) = DEFINE_SERVER_ROLE,
        /// Post.
        Post(Post) = POST,
        /// Sync.
        Sync(Sync) = SYNC,
        /// History.
        History(History) = HISTORY,
        /// Edit a message.
        Edit(Edit) = EDIT,
        /// Delete a message.
        Delete(DeleteMessage) = DELETE,
        /// React to a message.
        React(React) = REACT,
        /// Reply to a message.
        Reply(Reply) = REPLY,
        /// Pin a message.
        Pin(Pin) = PIN,
        /// Messages in their current state.
        View(View) = VIEW,
        /// A page of a room's whole log.
        Restore(Restore) = RESTORE,
        /// Messages that match a query.
        Search(Search) = SEARCH,
        /// Invite to, ban from or unban from a server.
        ModerateServer(ModerateServer) = MODERATE_SERVER,
        /// Start an upload.
        UploadBegin(UploadBegin) = UPLOAD_BEGIN,
        /// Where an upload stands.
        UploadResume(UploadResume) = UPLOAD_RESUME,
        /// Bytes of an upload.
        UploadChunk(UploadChunk) = UPLOAD_CHUNK,
        /// Finish an upload.
        UploadFinish(UploadFinish) = UPLOAD_FINISH,
        /// Download a file.
        Download(Download) = DOWNLOAD,
        /// Open a download's window.
        DownloadAck(DownloadAck) = DOWNLOAD_ACK,
        /// Forward a message.
        Forward(Forward) = FORWARD,
    }
}

frame_enum! {
    /// A frame a server sends.
    ServerFrame {
        /// See [`Welcome`].
        Welcome(Welcome) = WELCOME,
        /// Heartbeat.
        Ping(Ping) = SERVER_PING,
        /// Heartbeat answer.
        Pong(Ping) = SERVER_PONG,
        /// A request failed.
        Error(ErrorBody) = ERROR,
        /// Logged in.
        Authed(Authed) = AUTHED,
        /// Success without a result.
        Done(Empty) = DONE,
        /// A page of my sessions.
        SessionList(SessionList) = SESSION_LIST,
        /// Sessions revoked.
        SessionsRevoked(SessionsRevoked) = SESSIONS_REVOKED,
        /// Who the connection is logged in as.
        Identity(Identity) = IDENTITY,
        /// A user's profile.
        Profile(Profile) = PROFILE,
        /// A page of my settings.
        Settings(Settings) = SETTINGS,
        /// The setting stored.
        Setting(SettingChanged) = SETTING,
        /// One room.
        RoomInfo(RoomInfo) = ROOM_INFO,
        /// My rooms.
        RoomList(RoomList) = ROOM_LIST,
        /// A page of members.
        MemberList(MemberList) = MEMBER_LIST,
        /// One room in detail.
        RoomDetails(RoomDetails) = ROOM_DETAILS,
        /// One server.
        ServerInfo(Box<ServerInfo>) = SERVER_INFO,
        /// A room's read state.
        ReadState(ReadState) = READ_STATE,
        /// Rooms with something unread.
        UnreadList(UnreadList) = UNREAD_LIST,
        /// Recent mentions.
        NotificationList(NotificationList) = NOTIFICATION_LIST,
        /// Another device read.
        ReadStateChanged(ReadState) = READ_STATE_CHANGED,
        /// Presence of the users asked for.
        PresenceList(PresenceList) = PRESENCE_LIST,
        /// Someone is typing.
        TypingNow(TypingNow) = TYPING_NOW,
        /// A watched user's presence changed.
        PresenceChanged(PresenceEntry) = PRESENCE_CHANGED,
        /// My servers.
        ServerList(ServerList) = SERVER_LIST,
        /// Post is durable.
        Posted(Posted) = POSTED,
        /// A page of deltas.
        DeltaPage(DeltaPage) = DELTA_PAGE,
        /// Sync caught up.
        SyncDone(SyncDone) = SYNC_DONE,
        /// A page of messages in their current state.
        MessagePage(MessagePage) = MESSAGE_PAGE,
        /// A page of a room's whole log.
        RestorePage(RestorePage) = RESTORE_PAGE,
        /// PUBLISH push.
        Delta(Delta) = DELTA,
        /// Closing push.
        Goodbye(Goodbye) = GOODBYE,
        /// A setting changed on another connection of the user (push).
        SettingChanged(SettingChanged) = SETTING_CHANGED,
        /// Unread counts right after a login (push).
        UnreadAtLogin(UnreadList) = UNREAD_AT_LOGIN,
        /// An upload's state.
        UploadState(UploadState) = UPLOAD_STATE,
        /// A chunk was stored.
        ChunkStored(ChunkStored) = CHUNK_STORED,
        /// A file was stored and shared.
        FileStored(FileStored) = FILE_STORED,
        /// What a download streams.
        DownloadMeta(Box<DownloadMeta>) = DOWNLOAD_META,
        /// Bytes of a download (push).
        FileChunk(FileChunk) = FILE_CHUNK,
    }
}

impl ErrorBody {
    /// An error body whose `retryable` flag follows from the code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let retryable = matches!(
            code,
            ErrorCode::RATE_LIMITED | ErrorCode::OVERLOADED | ErrorCode::UNAVAILABLE | ErrorCode::SHUTTING_DOWN
        );
        ErrorBody { code, message: message.into(), retryable }
    }

    /// A `RATE_LIMITED` error whose message ends with when a retry will be admitted, in the form
    /// [`ErrorBody::retry_after_ms`] reads: `"MESSAGE (retry_after_ms=N)"`.
    pub fn rate_limited(message: impl std::fmt::Display, retry_after_ms: u64) -> Self {
        ErrorBody::new(ErrorCode::RATE_LIMITED, format!("{message} {RETRY_AFTER}{retry_after_ms})"))
    }

    /// How long to wait before retrying, in milliseconds, when the message ends with
    /// `(retry_after_ms=N)` (see [`ErrorBody::rate_limited`]); `None` otherwise.
    pub fn retry_after_ms(&self) -> Option<u64> {
        let (_, tail) = self.message.strip_suffix(')')?.rsplit_once(RETRY_AFTER)?;
        tail.parse().ok()
    }
}

/// What precedes the wait in a `RATE_LIMITED` message that states one. The message is for people,
/// but this one suffix is specified (docs/protocol.md, section 8) so that clients can honour it
/// without a new error body: `ERROR`'s layout is fixed for every version.
const RETRY_AFTER: &str = "(retry_after_ms=";

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_states_when_to_retry() {
        let e = ErrorBody::rate_limited("at most 200 RESTORE pages per second", 35);
        assert_eq!(e.code, ErrorCode::RATE_LIMITED);
        assert!(e.retryable);
        assert_eq!(e.message, "at most 200 RESTORE pages per second (retry_after_ms=35)");
        assert_eq!(e.retry_after_ms(), Some(35));
        let plain = ErrorBody::new(ErrorCode::RATE_LIMITED, "at most 10 rooms per minute; retry later");
        assert_eq!(plain.retry_after_ms(), None);
        let odd = ErrorBody::new(ErrorCode::RATE_LIMITED, "x (retry_after_ms=soon)");
        assert_eq!(odd.retry_after_ms(), None);
    }
}
