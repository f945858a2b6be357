//! What the event loop and the worker pool say to each other: jobs (`Work`) going out, and the
//! small closed set of `Effect`s coming back.
//!
//! A request that needs the store becomes a job built by its handler (`handlers/`) on the loop.
//! The job's queue is part of its type, so routing cannot be wrong: [`Work::Room`] jobs run on
//! their room's shard worker, the only thread that appends to that room's log (so its deltas are
//! committed and published in seq order), and only they get a [`Store`]; [`Work::Shared`] jobs
//! (reads, accounts, creating a room) run on any shard worker with a [`SharedStore`], which cannot
//! append to an existing room; [`Work::Auth`] jobs hash passwords on their own threads. Posts are
//! [`Work::Post`], a plain value the shard worker recognizes and commits in groups.
//!
//! A job returns effects; the loop carries them out in order: reply to a connection, publish a
//! room's new deltas, (un)subscribe a user's connections, push to a user's other connections,
//! start or end sessions, hand a page to a connection's SYNC state. The worker adds [`Effect::Release`] after each job, so a job's slot
//! in its connection's in-flight window is always given back, whatever the job did.

use crate::sync::FetchId;
use bytes::Bytes;
use chime_protocol::{
    CallBody, CreateBody, Delta, DeltaBody, DeltaKind, EditBody, ErrorBody, ErrorCode, MemberBody, ReactBody,
    ReplyBody, RoleBody, RoleDefinedBody, Seq, ServerFrame, TargetBody,
};
use chime_storage::{
    DeltaRecord, NewPost, RecordKind, RoomId, ServerId, SessionId, SessionLimits, SessionRecord, SharedStore, Store,
    StoreError, UserId,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Identifies a connection across slab-slot reuse: a completion for a connection that has gone
/// (and whose slot was reused) is dropped instead of reaching a stranger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// The slab key (mio token).
    pub key: usize,
    /// The connection's generation, unique for the life of the process.
    pub gen: u64,
}

/// Who is asking: a connection and a request id to answer on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The connection.
    pub conn: ConnRef,
    /// The request id to echo (0 for the connection's own SYNC fetches).
    pub request_id: u32,
}

/// The logged-in user a job runs as.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The user's id.
    pub user_id: UserId,
    /// The user's name, shared by all of the connection's jobs.
    pub name: Arc<str>,
}

/// What the workers know besides their jobs: limits from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Rooms one user may be a member of.
    pub max_rooms_per_user: u64,
    /// When sessions expire.
    pub session_limits: SessionLimits,
    /// The push-notification path, when a gateway is configured (`[notify] spool`).
    pub notifier: Option<crate::notify::Notifier>,
    /// The content store (file bytes); `None` in tests that run no file work.
    pub content: Option<ContentRef>,
}

/// The daemon's content store, shared by the workers and the file threads.
#[derive(Clone)]
pub struct ContentRef(pub Arc<crate::content::Content>);

impl std::fmt::Debug for ContentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ContentRef").field(&self.0.dir()).finish()
    }
}

/// A job for the pool; the variant is its queue.
pub enum Work {
    /// Writes to one existing room: its shard worker.
    Room(Box<dyn RoomWork>),
    /// A post: its room's shard worker, which commits the posts waiting together in one
    /// transaction.
    Post(PostWork),
    /// Reads and account work: any shard worker, after its own queue.
    Shared(Box<dyn SharedWork>),
    /// Password hashing: the auth workers.
    Auth(Box<dyn AuthWork>),
    /// File I/O and hashing: the file threads, where jobs with the same `order` key run in
    /// order on one thread (an upload's chunks, a download's reads).
    File(FileWork),
}

/// A job for the file threads.
pub struct FileWork {
    /// Jobs with the same key run on the same thread, in submission order.
    pub order: u64,
    /// Whether it is an upload's chunk write (counted against the connection's upload window).
    pub chunk: bool,
    /// The job.
    pub job: Box<dyn FileJob>,
}

/// A job that reads or writes file bytes, on a file thread.
pub trait FileJob: Send {
    /// Who it answers.
    fn reply_to(&self) -> Option<ReplyTo>;
    /// Runs it with the thread's state.
    fn run(self: Box<Self>, thread: &mut crate::handlers::files::FileThread) -> Vec<Effect>;
}

impl Work {
    /// Who the job answers (none for jobs nobody waits for).
    pub fn reply_to(&self) -> Option<ReplyTo> {
        match self {
            Work::Room(w) => w.reply_to(),
            Work::Post(p) => Some(p.to),
            Work::Shared(w) => w.reply_to(),
            Work::Auth(w) => w.reply_to(),
            Work::File(f) => f.job.reply_to(),
        }
    }

    /// Whether the job waits in the shared queue, where each connection has a small window.
    pub fn is_shared(&self) -> bool {
        matches!(self, Work::Shared(_))
    }
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (queue, to) = match self {
            Work::Room(w) => ("room", w.reply_to()),
            Work::Post(p) => ("post", Some(p.to)),
            Work::Shared(w) => ("shared", w.reply_to()),
            Work::Auth(w) => ("auth", w.reply_to()),
            Work::File(f) => ("file", f.job.reply_to()),
        };
        f.debug_struct("Work").field("queue", &queue).field("to", &to).finish()
    }
}

/// A job that writes to an existing room's log.
pub trait RoomWork: Send {
    /// The job itself, for tests that check what was submitted.
    fn as_any(&self) -> &dyn std::any::Any;
    /// The room: the job runs on its shard.
    fn room(&self) -> RoomId;
    /// Who it answers.
    fn reply_to(&self) -> Option<ReplyTo>;
    /// Runs it.
    fn run(self: Box<Self>, store: &mut dyn Store, settings: &Settings) -> Vec<Effect>;
}

/// A job that reads, or writes anything but an existing room's log.
pub trait SharedWork: Send {
    /// The job itself, for tests that check what was submitted.
    fn as_any(&self) -> &dyn std::any::Any;
    /// Who it answers.
    fn reply_to(&self) -> Option<ReplyTo>;
    /// Runs it.
    fn run(self: Box<Self>, store: &mut dyn SharedStore, settings: &Settings) -> Vec<Effect>;
}

/// A job that hashes a password.
pub trait AuthWork: Send {
    /// The job itself, for tests that check what was submitted.
    fn as_any(&self) -> &dyn std::any::Any;
    /// Who it answers.
    fn reply_to(&self) -> Option<ReplyTo>;
    /// Runs it with the thread's argon2 working area.
    fn run(
        self: Box<Self>,
        store: &mut dyn SharedStore,
        hasher: &mut crate::auth::Hasher,
        settings: &Settings,
    ) -> Vec<Effect>;
}

/// One post, committed with the others waiting on its room's shard (see `worker`).
#[derive(Debug)]
pub struct PostWork {
    /// Who gets the POSTED.
    pub to: ReplyTo,
    /// The post; its time is set at commit.
    pub post: NewPost,
}

/// Why a SYNC fetch read no page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFailure {
    /// The user is not a member: the room is left out of the SYNC.
    NotMember,
    /// The SYNC's cursor is past the room's head: the SYNC ends with the error, the room is
    /// dropped from it.
    CursorAhead,
    /// The database failed: the SYNC ends with the error, the fetch is retried.
    Store,
}

/// What a job asks the loop to do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Send an encoded frame (a reply) to a connection, if it is still there.
    Reply {
        /// The connection and request.
        to: ReplyTo,
        /// The encoded frame.
        frame: Bytes,
    },
    /// Fan a room's newly committed deltas out to its subscribers.
    Publish(Published),
    /// Subscribe every connection of `user` to `room`; they know its log up to `after`.
    Subscribe {
        /// The user.
        user: UserId,
        /// The room.
        room: RoomId,
        /// The last seq they are taken to know (the seq before their JOIN or the room's CREATE):
        /// a connection that missed later deltas already published catches up on them. `None`:
        /// nothing to catch up on (the user was a member already).
        after: Option<Seq>,
    },
    /// Unsubscribe every connection of `user` from `room`.
    Unsubscribe {
        /// The user.
        user: UserId,
        /// The room.
        room: RoomId,
    },
    /// Send a push (an encoded frame with request id 0) to every logged-in connection of `user`
    /// but `except`: the user's other devices learn of a change made on one (a setting). The
    /// connection that made it is `except`, as its reply already says so. Connections still
    /// logging in are not reached; they read the current state after their login.
    PushToUser {
        /// The user.
        user: UserId,
        /// The connection left out, if any.
        except: Option<ConnRef>,
        /// The encoded push.
        frame: Bytes,
    },
    /// The connection logged in: it becomes `session` of `user`, subscribed to `rooms` (id and
    /// head when read).
    LoggedIn {
        /// The connection (its reply follows as a `Reply`).
        to: ReplyTo,
        /// The user's id.
        user: UserId,
        /// The user's name.
        name: String,
        /// The session it logged in with.
        session: SessionRecord,
        /// The user's rooms and their heads, by id (channels of the user's servers included).
        rooms: Vec<(RoomId, Seq)>,
        /// The user's servers: their new channels reach the connection as they are created.
        servers: Vec<ServerId>,
    },
    /// `user` joined `server`: every connection of the user follows the server's new channels
    /// from now on and is subscribed to `channels` (id and head when read).
    JoinedServer {
        /// The user.
        user: UserId,
        /// The server.
        server: ServerId,
        /// The channels the user may read.
        channels: Vec<(RoomId, Seq)>,
    },
    /// `user` left `server`: its connections drop `channels` and the server.
    LeftServer {
        /// The user.
        user: UserId,
        /// The server.
        server: ServerId,
        /// The channels the user could read.
        channels: Vec<RoomId>,
    },
    /// A channel every member of `server` may read was created: every connection following the
    /// server is subscribed to it from its start.
    ChannelCreated {
        /// The server.
        server: ServerId,
        /// The channel.
        room: RoomId,
    },
    /// The connection logged out (its reply follows).
    LoggedOut {
        /// The connection.
        to: ReplyTo,
    },
    /// These sessions ended: every connection of them is closed with `code`.
    EndSessions {
        /// The sessions.
        sessions: Vec<SessionId>,
        /// Why (GOODBYE code).
        code: ErrorCode,
    },
    /// A page a SYNC fetch read, for the connection's sync state.
    Page {
        /// The connection.
        to: ReplyTo,
        /// The room.
        room: RoomId,
        /// The fetch it answers.
        fetch: FetchId,
        /// The deltas after the fetch's cursor.
        deltas: Vec<Delta>,
        /// Whether more follow.
        more: bool,
    },
    /// A SYNC fetch failed.
    PageFailed {
        /// The connection.
        to: ReplyTo,
        /// The room.
        room: RoomId,
        /// The fetch it answers.
        fetch: FetchId,
        /// Why.
        why: PageFailure,
        /// The error.
        error: ErrorBody,
    },
    /// The job for `to` is finished: its slot in the connection's window is free. Added by the
    /// worker after every job that answers someone.
    Release {
        /// The connection and request.
        to: ReplyTo,
        /// Whether the job took a slot of the connection's shared-queue window.
        shared: bool,
    },
    /// WATCH_PRESENCE read the watched users' durable last seen: the core registers the watch
    /// and answers with their presence, live state first, the stored last seen for those
    /// offline that it has not seen since it started.
    Watched {
        /// The connection and request.
        to: ReplyTo,
        /// The users watched, as asked (at most `MAX_WATCHED`).
        users: Vec<UserId>,
        /// Their stored last seen, Unix ms, for those ever seen.
        seen: Vec<(UserId, i64)>,
    },
    /// A channel only some roles may read was created: the core asks a worker which of the
    /// server's online followers (but `creator`, subscribed already) may read it, and subscribes
    /// those (as [`Effect::Subscribe`]s from that job).
    RestrictedChannelCreated {
        /// The server.
        server: ServerId,
        /// The channel.
        room: RoomId,
        /// Who created it.
        creator: UserId,
    },
    /// Submit this job for `to` next (a step of a request that continues on another queue: a
    /// verified upload goes from its file thread to its room's shard).
    Then {
        /// The request it continues.
        to: ReplyTo,
        /// The job.
        work: Work,
    },
    /// The connection may send chunks of this upload (it began or resumed it).
    UploadOpened {
        /// The connection and request.
        to: ReplyTo,
        /// The upload.
        upload: chime_storage::UploadRecord,
    },
    /// A download's metadata went out: stream `offset..end` of content `sha256`.
    DownloadOpened {
        /// The connection and the DOWNLOAD's request id.
        to: ReplyTo,
        /// The content.
        sha256: [u8; 32],
        /// First byte.
        offset: u64,
        /// End (exclusive).
        end: u64,
    },
    /// Chunks a file thread read for a download: encoded `FILE_CHUNK` pushes, then where the
    /// next read starts.
    FileChunks {
        /// The connection and the DOWNLOAD's request id.
        to: ReplyTo,
        /// The frames, in order.
        frames: Vec<Bytes>,
        /// The offset after the last one.
        next: u64,
    },
    /// A download cannot go on (its ERROR is on its way).
    DownloadEnded {
        /// The connection and the DOWNLOAD's request id.
        to: ReplyTo,
    },
    /// A file job for `to` is done (its in-flight slot, and for a chunk its upload-window slot,
    /// are free). Added by the file thread after every job.
    FileReleased {
        /// The connection and request.
        to: ReplyTo,
        /// Whether it was an upload chunk.
        chunk: bool,
    },
}

/// Effects of one worker batch, handed to the loop together.
#[derive(Debug)]
pub struct Completion(pub Vec<Effect>);

/// Encoding for the daemon's replies: the protocol's encoder refuses a frame over the largest
/// frame size, and a reply that would not fit (a bug: every list is paged and every page is cut
/// to a byte budget) goes out as an `INTERNAL` error instead, logged.
pub trait EncodeReply {
    /// The encoded frame, or an `INTERNAL` error frame with the same request id.
    fn reply(&self, request_id: u32) -> Bytes;
}

impl EncodeReply for ServerFrame {
    fn reply(&self, request_id: u32) -> Bytes {
        match self.encode(request_id) {
            Ok(bytes) => bytes,
            Err(e) => {
                log::error!("not sending a reply: {e}");
                let error = ErrorBody::new(ErrorCode::INTERNAL, "the reply would exceed the largest frame size");
                ServerFrame::Error(error).encode(request_id).unwrap_or_default()
            }
        }
    }
}

/// A reply effect: `frame` encoded for `to`.
pub fn reply(to: ReplyTo, frame: ServerFrame) -> Effect {
    Effect::Reply { to, frame: frame.reply(to.request_id) }
}

/// An ERROR reply effect.
pub fn refuse(to: ReplyTo, error: ErrorBody) -> Effect {
    reply(to, ServerFrame::Error(error))
}

/// What a request that appended one delta to its room leads to: its POSTED answer, then the
/// delta published to the room's subscribers.
pub fn appended(to: ReplyTo, delta: DeltaRecord) -> Vec<Effect> {
    let room = delta.room;
    let posted = chime_protocol::Posted { room: delta.room, seq: delta.seq, ts_ms: delta.ts_ms, duplicate: false };
    let mut effects = vec![reply(to, ServerFrame::Posted(posted))];
    effects.extend(Published::encode(room, &[wire_delta(delta)]).map(Effect::Publish));
    effects
}

/// A stored delta as the wire carries it: the one place where the store's record becomes the
/// protocol's tagged body, so the schema and the wire can change separately.
pub fn wire_delta(r: DeltaRecord) -> Delta {
    let target = r.target.unwrap_or(Seq::ZERO);
    let body = match r.kind {
        RecordKind::CREATE => DeltaBody::Create(CreateBody { name: r.body }),
        RecordKind::MESSAGE => DeltaBody::message(r.body),
        RecordKind::JOIN => DeltaBody::Join,
        RecordKind::LEAVE => DeltaBody::Leave,
        RecordKind::EDIT => DeltaBody::Edit(EditBody { target, text: r.body }),
        RecordKind::DELETE => DeltaBody::Delete(TargetBody { target }),
        RecordKind::REACT => DeltaBody::React(ReactBody { target, emoji: r.body }),
        RecordKind::UNREACT => DeltaBody::Unreact(ReactBody { target, emoji: r.body }),
        RecordKind::REPLY => DeltaBody::Reply(ReplyBody { reply_to: target, text: r.body }),
        RecordKind::PIN => DeltaBody::Pin(TargetBody { target }),
        RecordKind::UNPIN => DeltaBody::Unpin(TargetBody { target }),
        RecordKind::INVITE
        | RecordKind::KICK
        | RecordKind::BAN
        | RecordKind::UNBAN
        | RecordKind::MUTE
        | RecordKind::UNMUTE => {
            let m = MemberBody { user: UserId(target.get()), name: r.body };
            match r.kind {
                RecordKind::INVITE => DeltaBody::Invite(m),
                RecordKind::KICK => DeltaBody::Kick(m),
                RecordKind::BAN => DeltaBody::Ban(m),
                RecordKind::UNBAN => DeltaBody::Unban(m),
                RecordKind::MUTE => DeltaBody::Mute(m),
                _ => DeltaBody::Unmute(m),
            }
        }
        RecordKind::CALL_INVITE => DeltaBody::CallInvite(CallBody { call: Seq::ZERO, data: r.body }),
        RecordKind::CALL_ACCEPT => DeltaBody::CallAccept(CallBody { call: target, data: r.body }),
        RecordKind::CALL_END => DeltaBody::CallEnd(CallBody { call: target, data: r.body }),
        RecordKind::ROLE => DeltaBody::Role(RoleBody { user: UserId(target.get()), role: r.body }),
        RecordKind::ROLE_DEFINED => {
            let (role, permissions) = chime_storage::moderation::parse_role_body(&r.body);
            DeltaBody::RoleDefined(RoleDefinedBody { role, permissions })
        }
        RecordKind::FILE_SHARED => {
            let (sha256, size, media_type, name, caption) = chime_storage::files::decode_body(&r.body);
            DeltaBody::FileShared(Box::new(chime_protocol::FileBody {
                file: target.get(),
                name,
                size,
                media_type,
                sha256,
                caption,
            }))
        }
        // Not written by this build (a newer one's row, after a downgrade): passed on as a kind
        // clients skip.
        RecordKind(other) => DeltaBody::Unknown { kind: DeltaKind(u16::from(other)), payload: Vec::new() },
    };
    Delta { room: r.room, seq: r.seq, author_id: r.author_id, author: r.author, ts_ms: r.ts_ms, body }
}

/// Maps a store error to the wire, in this one place, logging what the client is not told.
pub fn store_error(e: &StoreError) -> ErrorBody {
    let (code, msg) = match e {
        StoreError::Conflict(m) => (ErrorCode::USER_EXISTS, format!("already exists: {m}")),
        StoreError::NotFound(m) => (ErrorCode::NOT_FOUND, format!("not found: {m}")),
        StoreError::NotMember(room) => (ErrorCode::NOT_MEMBER, format!("not a member of room {room}")),
        StoreError::LimitReached(m) => (ErrorCode::LIMIT_REACHED, m.clone()),
        StoreError::Forbidden(m) => (ErrorCode::FORBIDDEN, m.clone()),
        // Logged once, by `Health`, for the whole outage.
        StoreError::Unavailable(_) => {
            (ErrorCode::UNAVAILABLE, "the database is unavailable; retry shortly".to_string())
        }
        other => {
            log::error!("store error: {other:?}");
            (ErrorCode::INTERNAL, "internal error".to_string())
        }
    };
    ErrorBody::new(code, msg)
}

/// A room's newly committed deltas, encoded once, contiguous in seq.
#[derive(Debug, Clone)]
pub struct Published {
    /// The room.
    pub room: RoomId,
    /// The seq of the first delta in `frames`.
    pub first_seq: Seq,
    /// `DELTA` push frames for seqs `first_seq..`, back to back.
    pub frames: Bytes,
    /// End offset of each frame in `frames` (frame i is `ends[i-1]..ends[i]`).
    pub ends: Vec<u32>,
}

impl Published {
    /// The seq of the last delta.
    pub fn last_seq(&self) -> Seq {
        Seq(self.first_seq.0 + self.ends.len() as u64 - 1)
    }

    /// The frames for seqs greater than `after` (all of them if `after < first_seq`).
    pub fn frames_after(&self, after: Seq) -> Bytes {
        if after < self.first_seq {
            return self.frames.clone();
        }
        let skip = (after.0 - self.first_seq.0 + 1) as usize;
        match skip.checked_sub(1).and_then(|i| self.ends.get(i)) {
            Some(&start) => self.frames.slice(start as usize..),
            None => Bytes::new(),
        }
    }

    /// Encodes `deltas` (one room's, contiguous) as push frames; `None` when there are none.
    pub fn encode(room: RoomId, deltas: &[Delta]) -> Option<Published> {
        let first_seq = deltas.first()?.seq;
        let mut buf = Vec::with_capacity(deltas.len() * 96);
        let mut ends = Vec::with_capacity(deltas.len());
        for d in deltas {
            if let Err(e) = ServerFrame::Delta(d.clone()).encode_into(&mut buf, 0) {
                // Cannot happen for texts within the limits; the deltas encoded so far are still
                // contiguous, and a client's gap check finds the rest in the log.
                log::error!("not publishing room {room} from seq {}: {e}", d.seq);
                break;
            }
            ends.push(buf.len() as u32);
        }
        if ends.is_empty() {
            return None;
        }
        Some(Published { room, first_seq, frames: Bytes::from_owner(Counted::new(buf)), ends })
    }
}

/// Bytes of published frames alive anywhere in this process (in queues of connections that have
/// not sent them yet, held by catching-up connections, on their way to the loop). Each batch is
/// one allocation shared by all its recipients, so it is counted once here, from its encoding
/// until the last reference to it is dropped: the server-wide outbound budget adds this to what
/// connections hold alone.
static PUBLISHED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The current value of [`PUBLISHED_BYTES`].
pub fn published_bytes() -> usize {
    PUBLISHED_BYTES.load(Ordering::Relaxed)
}

/// A published buffer that counts itself in [`PUBLISHED_BYTES`] while it lives.
struct Counted(Vec<u8>);

impl Counted {
    fn new(buf: Vec<u8>) -> Counted {
        PUBLISHED_BYTES.fetch_add(buf.capacity(), Ordering::Relaxed);
        Counted(buf)
    }
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        PUBLISHED_BYTES.fetch_sub(self.0.capacity(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chime_protocol::{RoomId, UserId};

    fn delta(seq: u64) -> Delta {
        Delta {
            room: RoomId(7),
            seq: Seq(seq),
            author_id: UserId(1),
            author: "a".into(),
            ts_ms: 0,
            body: DeltaBody::message("x"),
        }
    }

    #[test]
    fn frames_after_slices_whole_frames() {
        let p = Published::encode(RoomId(7), &[delta(5), delta(6), delta(7)]).expect("non-empty");
        assert_eq!(p.last_seq(), Seq(7));
        assert_eq!(p.frames_after(Seq(0)), p.frames);
        assert_eq!(p.frames_after(Seq(4)), p.frames);
        let one = ServerFrame::Delta(delta(7)).reply(0);
        assert_eq!(p.frames_after(Seq(6)), one);
        assert!(p.frames_after(Seq(7)).is_empty());
        assert!(p.frames_after(Seq(100)).is_empty());
    }

    #[test]
    fn stored_kinds_become_tagged_bodies() {
        let record = |kind, body: &str| DeltaRecord {
            room: RoomId(1),
            seq: Seq(2),
            kind,
            author_id: UserId(3),
            author: "ann".into(),
            ts_ms: 4,
            body: body.into(),
            target: None,
        };
        let d = wire_delta(record(RecordKind::MESSAGE, "hi"));
        assert_eq!((d.room, d.seq, d.author_id, d.ts_ms), (RoomId(1), Seq(2), UserId(3), 4));
        assert_eq!(d.body, DeltaBody::message("hi"));
        assert_eq!(
            wire_delta(record(RecordKind::CREATE, "r")).body,
            DeltaBody::Create(CreateBody { name: "r".into() })
        );
        assert_eq!(wire_delta(record(RecordKind::JOIN, "")).body, DeltaBody::Join);
        assert_eq!(wire_delta(record(RecordKind::LEAVE, "")).body, DeltaBody::Leave);
        let on = |kind, body: &str| wire_delta(DeltaRecord { target: Some(Seq(2)), ..record(kind, body) }).body;
        assert_eq!(on(RecordKind::EDIT, "e"), DeltaBody::Edit(EditBody { target: Seq(2), text: "e".into() }));
        assert_eq!(on(RecordKind::DELETE, ""), DeltaBody::Delete(TargetBody { target: Seq(2) }));
        assert_eq!(on(RecordKind::REACT, "x"), DeltaBody::React(ReactBody { target: Seq(2), emoji: "x".into() }));
        assert_eq!(on(RecordKind::UNREACT, "x"), DeltaBody::Unreact(ReactBody { target: Seq(2), emoji: "x".into() }));
        assert_eq!(on(RecordKind::REPLY, "r"), DeltaBody::Reply(ReplyBody { reply_to: Seq(2), text: "r".into() }));
        assert_eq!(on(RecordKind::PIN, ""), DeltaBody::Pin(TargetBody { target: Seq(2) }));
        assert_eq!(on(RecordKind::UNPIN, ""), DeltaBody::Unpin(TargetBody { target: Seq(2) }));
        let unknown = wire_delta(record(RecordKind(99), "?")).body;
        assert_eq!(unknown, DeltaBody::Unknown { kind: DeltaKind(99), payload: Vec::new() });
    }
}
