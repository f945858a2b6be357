//! The database worker pool: every piece of work that touches the store runs here, never on the
//! event loop.
//!
//! Threads and queues:
//! - `workers` **shard workers**, each owning one store connection. Everything that writes to a
//!   room (posts, joins, leaves) goes to the shard `room % workers`, so one room's deltas are
//!   committed and published by one thread in seq order. Reads and account work with no room
//!   (sync pages, history, room lists, resume, create room) go to a queue that every shard worker
//!   also serves.
//! - `auth_workers` **auth workers** for register and login: argon2id takes tens of milliseconds
//!   on purpose, and must not sit in front of anyone's post.
//!
//! Group commit: a shard worker that takes a post drains every job already waiting in its queue
//! (up to `max_batch`), and commits the consecutive posts among them in one transaction, so a
//! burst of N posts costs one fsync instead of N. Jobs keep their queue order, so a join followed
//! by a post from the same connection is applied in that order.
//!
//! Results go back to the loop over one channel as [`Completion`]s, followed by one wake of the
//! loop's `mio::Waker` per batch. Reply frames and published deltas are encoded here, off the
//! loop thread; a batch's deltas for one room are encoded once into one contiguous buffer that
//! the loop shares with every recipient.

use crate::auth;
use crate::health::{Health, StoreSlot};
use crate::sync::FetchId;
use bytes::Bytes;
use chime_protocol::{
    Authed, Delta, DeltaPage, ErrorBody, ErrorCode, MemberInfo, MemberList, Posted, RoomInfo, RoomList, ServerFrame,
    SessionInfo, SessionList, SessionsRevoked,
};
use chime_storage::{
    now_ms, NewPost, NewSession, OpenOptions, PostOutcome, RoomRecord, SessionId, SessionLimits, SessionRecord, Store,
    StoreError,
};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    /// The connection.
    pub conn: ConnRef,
    /// The request id to echo.
    pub request_id: u32,
    /// Whether the job runs on the shared queue, where each connection has a small window of
    /// jobs (set by the loop when it submits the job; the completion gives the slot back).
    pub shared: bool,
}

/// The queue a job runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// The shard of this room: every write to a room, so one thread commits and publishes it.
    Shard(u64),
    /// Reads and account work, served by every shard worker after its own queue.
    Shared,
    /// Password hashing.
    Auth,
}

/// The logged-in user a job runs as.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The user's id.
    pub user_id: u64,
    /// The user's name, shared by all of the connection's jobs.
    pub name: Arc<str>,
}

/// A unit of work for the pool. `to` is always who gets the answer; `actor` the user it runs as.
#[derive(Debug)]
#[allow(missing_docs)] // Fields are named after the protocol fields they carry (docs/protocol.md).
pub enum Job {
    /// Register (`register = true`) or log in with a password. Auth pool.
    Password { to: ReplyTo, register: bool, user: String, password: String, ip: String, user_agent: String },
    /// Log in with a session token.
    Resume { to: ReplyTo, token: String },
    /// Revoke one of the actor's sessions (`which`), or all of them. `logout`: this is the
    /// connection's own LOGOUT (answered DONE; the connection stays, logged out).
    RevokeSessions { to: ReplyTo, actor: Actor, which: Option<SessionId>, logout: bool },
    /// A page of the actor's live sessions; `current` is the asking connection's, `online` those
    /// with a live connection (their last use is now).
    ListSessions { to: ReplyTo, actor: Actor, current: SessionId, online: Vec<SessionId>, after: u64, limit: u32 },
    /// Record now as the last use of these sessions (connections that closed, or long-lived
    /// ones). Nobody waits for it: no completion.
    TouchSessions { sessions: Vec<SessionId> },
    /// Create a room.
    CreateRoom { to: ReplyTo, actor: Actor, name: String, kind: chime_protocol::RoomKind },
    /// Join a room (shard job).
    Join { to: ReplyTo, actor: Actor, room: u64 },
    /// Leave a room (shard job).
    Leave { to: ReplyTo, actor: Actor, room: u64 },
    /// List the actor's rooms.
    ListRooms { to: ReplyTo, actor: Actor, after_room: u64, limit: u32 },
    /// A page of members.
    ListMembers { to: ReplyTo, actor: Actor, room: u64, after_user: u64, limit: u32 },
    /// A post (shard job; group-committed).
    Post { to: ReplyTo, post: NewPost },
    /// One page of deltas after a seq, for SYNC, HISTORY or a catch-up. Checks membership.
    Fetch { to: ReplyTo, actor: Actor, room: u64, after: u64, limit: u32, purpose: FetchPurpose },
    /// Finish what was queued before this, then exit (shard and auth queues, at shutdown).
    Stop,
}

impl Job {
    /// Where the job runs. Exhaustive on purpose: a new job kind must say where it goes, and a
    /// room write must go to its room's shard (one writer per room keeps seqs in commit order).
    pub fn queue(&self) -> Queue {
        match self {
            Job::Password { .. } => Queue::Auth,
            Job::Post { post, .. } => Queue::Shard(post.room),
            Job::Join { room, .. } | Job::Leave { room, .. } => Queue::Shard(*room),
            Job::Resume { .. }
            | Job::RevokeSessions { .. }
            | Job::ListSessions { .. }
            | Job::TouchSessions { .. }
            | Job::CreateRoom { .. }
            | Job::ListRooms { .. }
            | Job::ListMembers { .. }
            | Job::Fetch { .. }
            | Job::Stop => Queue::Shared,
        }
    }

    /// Who the job answers (none for `Stop` and `TouchSessions`).
    pub fn reply_to_mut(&mut self) -> Option<&mut ReplyTo> {
        match self {
            Job::Password { to, .. }
            | Job::Resume { to, .. }
            | Job::RevokeSessions { to, .. }
            | Job::ListSessions { to, .. }
            | Job::CreateRoom { to, .. }
            | Job::Join { to, .. }
            | Job::Leave { to, .. }
            | Job::ListRooms { to, .. }
            | Job::ListMembers { to, .. }
            | Job::Post { to, .. }
            | Job::Fetch { to, .. } => Some(to),
            Job::Stop | Job::TouchSessions { .. } => None,
        }
    }
}

/// Why a page of deltas is fetched; decides how the loop uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchPurpose {
    /// A HISTORY request: the reply is one `DELTA_PAGE`, encoded here.
    History,
    /// Fetch `FetchId` of the connection's sync state (a SYNC page or a catch-up): the loop
    /// hands the result to the state machine.
    Sync(FetchId),
}

/// A room's newly committed deltas, encoded once, contiguous in seq.
#[derive(Debug, Clone)]
pub struct Published {
    /// The room.
    pub room: u64,
    /// The seq of the first delta in `frames`.
    pub first_seq: u64,
    /// `DELTA` push frames for seqs `first_seq..`, back to back.
    pub frames: Bytes,
    /// End offset of each frame in `frames` (frame i is `ends[i-1]..ends[i]`).
    pub ends: Vec<u32>,
}

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

impl Published {
    /// The seq of the last delta.
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.ends.len() as u64 - 1
    }

    /// The frames for seqs greater than `after` (all of them if `after < first_seq`).
    pub fn frames_after(&self, after: u64) -> Bytes {
        if after < self.first_seq {
            return self.frames.clone();
        }
        let skip = (after - self.first_seq + 1) as usize;
        match skip.checked_sub(1).and_then(|i| self.ends.get(i)) {
            Some(&start) => self.frames.slice(start as usize..),
            None => Bytes::new(),
        }
    }

    /// Encodes `deltas` (one room's, contiguous) as push frames; `None` when there are none.
    pub fn encode(room: u64, deltas: &[Delta]) -> Option<Published> {
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

/// A result for the loop. `frame` is the encoded reply for `to`.
#[derive(Debug)]
#[allow(missing_docs)] // Each variant says what its fields are for.
pub enum Completion {
    /// A finished reply to send as is.
    Reply { to: ReplyTo, frame: Bytes },
    /// A successful login with `session`: subscribe the connection to `rooms` (id, head seq when
    /// read), then send `frame`.
    LoggedIn { to: ReplyTo, user_id: u64, name: String, session: SessionRecord, rooms: Vec<(u64, u64)>, frame: Bytes },
    /// Sessions of `user_id` were revoked: end every connection of them (GOODBYE
    /// `SESSION_REVOKED`), except that a LOGOUT (`logout`) leaves its own connection open and
    /// logged out; the requester gets `frame` first.
    SessionsRevoked { to: ReplyTo, user_id: u64, revoked: Vec<SessionId>, logout: bool, frame: Bytes },
    /// A user's membership changed: (un)subscribe all of their connections, publish, then reply.
    Membership { to: ReplyTo, user_id: u64, room: u64, joined: bool, published: Option<Published>, frame: Bytes },
    /// One group commit: publish, then send the replies.
    Batch { published: Vec<Published>, replies: Vec<(ReplyTo, Bytes)> },
    /// The page fetch `fetch` read, for a SYNC or catch-up (not yet encoded: the loop filters
    /// against what the connection already has).
    Page { to: ReplyTo, room: u64, fetch: FetchId, deltas: Vec<Delta>, more: bool },
    /// Fetch `fetch` failed: the user is not a member (the room is left out of the SYNC), or the
    /// database failed (the SYNC ends with `error`).
    PageFailed { to: ReplyTo, room: u64, fetch: FetchId, not_member: bool, error: ErrorBody },
}

/// The loop's end of the pool.
pub struct Pool {
    shards: Vec<Sender<Job>>,
    shared: Sender<Job>,
    auth: Sender<Job>,
    threads: Vec<JoinHandle<()>>,
    /// Whether the database is usable, as the workers see it.
    health: Arc<Health>,
    /// Stops the housekeeping thread (dropped at shutdown).
    housekeeping: Option<(Sender<()>, JoinHandle<()>)>,
}

/// What the workers need besides their jobs: limits from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Database worker threads (posts are sharded over them by room).
    pub workers: usize,
    /// Password-hashing threads.
    pub auth_workers: usize,
    /// Most posts committed in one transaction.
    pub max_batch: usize,
    /// Rooms one user may be a member of.
    pub max_rooms_per_user: u64,
    /// When sessions expire.
    pub session_limits: SessionLimits,
    /// How long an embedded-store write waits for a lock.
    pub busy_timeout: Duration,
}

/// How often the housekeeping thread checkpoints the embedded store's WAL.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Why a job could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The queue is full: answer OVERLOADED, the client retries.
    Full,
    /// The pool is stopping.
    Stopped,
}

/// Queue bounds: enough to absorb bursts (a connection has at most 256 requests in flight), small
/// enough that a stalled database shows up as OVERLOADED replies rather than unbounded memory.
/// crossbeam's bounded channels allocate and touch every slot up front, so this is also resident
/// memory: about 3 MiB per queue.
const SHARD_QUEUE: usize = 16_384;
const AUTH_QUEUE: usize = 1_024;

/// How the pool reports back.
pub struct Notify {
    /// Where completions go.
    pub completions: Sender<Completion>,
    /// Wakes the loop once per batch of completions.
    pub waker: Arc<mio::Waker>,
}

impl Notify {
    fn send_all(&self, done: impl IntoIterator<Item = Completion>) {
        let mut any = false;
        for c in done {
            // The loop holds the receiver until every worker has exited; a failed send means it
            // is gone and nobody is waiting for the result.
            any |= self.completions.send(c).is_ok();
        }
        if any {
            if let Err(e) = self.waker.wake() {
                log::error!("waking the event loop failed: {e}");
            }
        }
    }
}

impl Pool {
    /// Opens one store per thread and starts the threads. Fails if any store cannot be opened
    /// (at start-up an unreachable database is a configuration error; later, an outage).
    pub fn start(database_url: &str, settings: Settings, notify: Notify) -> anyhow::Result<Pool> {
        let notify = Arc::new(notify);
        let settings = Arc::new(settings);
        let health = Arc::new(Health::new(settings.workers + settings.auth_workers));
        let embedded = !database_url.starts_with("postgres://") && !database_url.starts_with("postgresql://");
        // Workers never checkpoint the embedded store's WAL inside a commit: the housekeeping
        // thread below does, so a commit's latency is its own fsync and nothing else.
        let options =
            OpenOptions { busy_timeout: settings.busy_timeout, manual_checkpoints: embedded, ..OpenOptions::default() };
        let (shared_tx, shared_rx) = crossbeam_channel::bounded::<Job>(SHARD_QUEUE);
        let (auth_tx, auth_rx) = crossbeam_channel::bounded::<Job>(AUTH_QUEUE);
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        for i in 0..settings.workers {
            let store = chime_storage::open_with(database_url, &options)?;
            let slot = StoreSlot::new(i, database_url, options.clone(), store, health.clone());
            let (tx, rx) = crossbeam_channel::bounded::<Job>(SHARD_QUEUE);
            shards.push(tx);
            let shared_rx = shared_rx.clone();
            let (notify, settings) = (notify.clone(), settings.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("chimed-db-{i}"))
                    .spawn(move || shard_main(slot, rx, shared_rx, &settings, &notify))?,
            );
        }
        for i in 0..settings.auth_workers {
            let store = chime_storage::open_with(database_url, &options)?;
            let slot = StoreSlot::new(settings.workers + i, database_url, options.clone(), store, health.clone());
            let rx = auth_rx.clone();
            let (notify, settings) = (notify.clone(), settings.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("chimed-auth-{i}"))
                    .spawn(move || auth_main(slot, rx, &settings, &notify))?,
            );
        }
        let housekeeping = if embedded {
            let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
            let url = database_url.to_string();
            let busy_timeout = settings.busy_timeout;
            let thread = std::thread::Builder::new()
                .name("chimed-housekeeping".into())
                .spawn(move || housekeeping_main(&url, busy_timeout, &stop_rx))?;
            Some((stop_tx, thread))
        } else {
            None
        };
        Ok(Pool { shards, shared: shared_tx, auth: auth_tx, threads, health, housekeeping })
    }

    /// Whether the database is usable; while it is down the loop refuses new store work.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Queues a job on the right queue without blocking.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        let queue = match job.queue() {
            Queue::Auth => &self.auth,
            Queue::Shard(room) => self.shard(room),
            Queue::Shared => &self.shared,
        };
        match queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Busy::Full),
            Err(TrySendError::Disconnected(_)) => Err(Busy::Stopped),
        }
    }

    fn shard(&self, room: u64) -> &Sender<Job> {
        &self.shards[(room % self.shards.len() as u64) as usize]
    }

    /// Lets every worker finish what is queued, then stops it and waits for it to exit.
    pub fn shutdown(self) {
        let Pool { shards, shared, auth, threads, health: _, housekeeping } = self;
        if let Some((stop, thread)) = housekeeping {
            drop(stop);
            if thread.join().is_err() {
                log::error!("the housekeeping thread panicked");
            }
        }
        // An explicit stop behind the queued jobs rather than relying on disconnection alone:
        // a worker parked in a select must wake up for it whatever else it listens to.
        for tx in &shards {
            let _ = tx.send(Job::Stop);
        }
        let auth_threads = threads.len() - shards.len();
        for _ in 0..auth_threads {
            let _ = auth.send(Job::Stop);
        }
        drop((shards, shared, auth));
        for t in threads {
            if t.join().is_err() {
                log::error!("a database worker panicked");
            }
        }
    }
}

fn error_frame(to: &ReplyTo, code: ErrorCode, message: impl Into<String>) -> Bytes {
    ServerFrame::Error(ErrorBody::new(code, message)).reply(to.request_id)
}

/// A store error as an encoded ERROR reply to `to`.
fn store_error_frame(to: &ReplyTo, e: &StoreError) -> Bytes {
    ServerFrame::Error(store_error(e)).reply(to.request_id)
}

/// Maps a store error to the wire, in this one place, logging what the client is not told.
fn store_error(e: &StoreError) -> ErrorBody {
    let (code, msg) = match e {
        StoreError::Conflict(m) => (ErrorCode::USER_EXISTS, format!("already exists: {m}")),
        StoreError::NotFound(m) => (ErrorCode::NOT_FOUND, format!("not found: {m}")),
        StoreError::NotMember(room) => (ErrorCode::NOT_MEMBER, format!("not a member of room {room}")),
        StoreError::LimitReached(m) => (ErrorCode::LIMIT_REACHED, m.clone()),
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

fn room_info(r: &RoomRecord) -> RoomInfo {
    RoomInfo { room: r.id, name: r.name.clone(), kind: r.kind, head_seq: r.last_seq }
}

fn shard_main(mut slot: StoreSlot, own: Receiver<Job>, shared: Receiver<Job>, settings: &Settings, notify: &Notify) {
    let mut jobs: Vec<Job> = Vec::with_capacity(settings.max_batch);
    loop {
        slot.maintain();
        // Own (write) jobs first: they are what clients wait on for acks. Waiting is bounded so
        // that an idle worker still looks after its store (see `health`).
        let first = match own.try_recv() {
            Ok(j) => j,
            Err(_) => crossbeam_channel::select! {
                recv(own) -> j => match j { Ok(j) => j, Err(_) => return },
                recv(shared) -> j => match j { Ok(j) => j, Err(_) => match own.recv() { Ok(j) => j, Err(_) => return } },
                default(slot.wait()) => continue,
            },
        };
        if matches!(first, Job::Stop) {
            return;
        }
        jobs.clear();
        jobs.push(first);
        let mut stop = false;
        if matches!(jobs[0], Job::Post { .. }) {
            while jobs.len() < settings.max_batch {
                match own.try_recv() {
                    Ok(Job::Stop) => {
                        stop = true;
                        break;
                    }
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
        }
        let mut out = Vec::new();
        let mut posts: Vec<(ReplyTo, NewPost)> = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Post { to, post } => posts.push((to, post)),
                other => {
                    commit_posts(&mut slot, &mut posts, &mut out);
                    out.extend(run_job(&mut slot, settings, other));
                }
            }
        }
        commit_posts(&mut slot, &mut posts, &mut out);
        notify.send_all(out);
        if stop {
            return;
        }
    }
}

/// Checkpoints the embedded store's WAL twice a second, off every commit path: a PASSIVE
/// checkpoint never waits for writers, and writers never wait for it. Its failures are not
/// outages (the workers' own calls tell those); it reopens its store and tries again.
fn housekeeping_main(url: &str, busy_timeout: Duration, stop: &Receiver<()>) {
    let options = OpenOptions { busy_timeout, ..OpenOptions::default() };
    let mut store: Option<Box<dyn Store>> = None;
    loop {
        match stop.recv_timeout(CHECKPOINT_EVERY) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if store.is_none() {
            store = chime_storage::open_with(url, &options).ok();
        }
        if let Some(s) = store.as_mut() {
            if let Err(e) = s.checkpoint() {
                log::debug!("checkpoint failed: {e}");
                if e.is_unavailable() {
                    store = None;
                }
            }
        }
    }
}

fn commit_posts(store: &mut dyn Store, posts: &mut Vec<(ReplyTo, NewPost)>, out: &mut Vec<Completion>) {
    if posts.is_empty() {
        return;
    }
    let now = now_ms();
    let (tos, mut batch): (Vec<ReplyTo>, Vec<NewPost>) = posts.drain(..).unzip();
    for p in &mut batch {
        p.now_ms = now;
    }
    let mut replies = Vec::with_capacity(tos.len());
    let mut published: Vec<Published> = Vec::new();
    match store.append_posts(&batch) {
        Ok(outcomes) => {
            let mut by_room: Vec<(u64, Vec<Delta>)> = Vec::new();
            for ((to, post), outcome) in tos.iter().zip(&batch).zip(outcomes) {
                let frame = match outcome {
                    PostOutcome::Inserted(delta) => {
                        let posted = Posted { room: delta.room, seq: delta.seq, ts_ms: delta.ts_ms, duplicate: false };
                        match by_room.iter_mut().find(|(r, _)| *r == delta.room) {
                            Some((_, v)) => v.push(delta),
                            None => by_room.push((delta.room, vec![delta])),
                        }
                        ServerFrame::Posted(posted).reply(to.request_id)
                    }
                    PostOutcome::Duplicate { seq, ts_ms } => {
                        ServerFrame::Posted(Posted { room: post.room, seq, ts_ms, duplicate: true })
                            .reply(to.request_id)
                    }
                    PostOutcome::NotMember => {
                        error_frame(to, ErrorCode::NOT_MEMBER, format!("not a member of room {}", post.room))
                    }
                };
                replies.push((*to, frame));
            }
            published.extend(by_room.iter().filter_map(|(room, deltas)| Published::encode(*room, deltas)));
        }
        Err(e) => {
            for to in &tos {
                replies.push((*to, store_error_frame(to, &e)));
            }
        }
    }
    out.push(Completion::Batch { published, replies });
}

/// Runs one job that is not a post. `None` for `Stop` (which the caller acts on) and for jobs
/// nobody waits for.
fn run_job(store: &mut dyn Store, settings: &Settings, job: Job) -> Option<Completion> {
    Some(match job {
        Job::Resume { to, token } => {
            let hash = auth::token_hash(&token);
            match store.session_user(&hash, now_ms(), &settings.session_limits) {
                Ok(Some((user, session))) => logged_in(store, to, user.id, user.name, session, None),
                Ok(None) => Completion::Reply {
                    frame: error_frame(&to, ErrorCode::AUTH_FAILED, "unknown, revoked or expired session token"),
                    to,
                },
                Err(e) => Completion::Reply { frame: store_error_frame(&to, &e), to },
            }
        }
        Job::RevokeSessions { to, actor, which, logout } => {
            match store.revoke_sessions(actor.user_id, which, now_ms()) {
                Ok(revoked) => {
                    let frame = if logout {
                        ServerFrame::Done(Default::default()).reply(to.request_id)
                    } else {
                        let count = u32::try_from(revoked.len()).unwrap_or(u32::MAX);
                        ServerFrame::SessionsRevoked(SessionsRevoked { count }).reply(to.request_id)
                    };
                    Completion::SessionsRevoked { to, user_id: actor.user_id, revoked, logout, frame }
                }
                Err(e) => Completion::Reply { frame: store_error_frame(&to, &e), to },
            }
        }
        Job::ListSessions { to, actor, current, online, after, limit } => {
            let now = now_ms();
            let frame = match store.list_sessions(actor.user_id, now, &settings.session_limits) {
                Ok(all) => {
                    let mut page: Vec<SessionInfo> = all
                        .into_iter()
                        .filter(|s| s.id > after)
                        .take(limit as usize + 1)
                        .map(|s| SessionInfo {
                            session: s.id,
                            last_seen_ms: if online.contains(&s.id) { now } else { s.last_used_at_ms },
                            current: s.id == current,
                            ip: s.ip,
                            user_agent: s.user_agent,
                            created_ms: s.created_at_ms,
                        })
                        .collect();
                    let more = page.len() > limit as usize;
                    page.truncate(limit as usize);
                    let next_after = if more { page.last().map(|s| s.session) } else { None };
                    ServerFrame::SessionList(SessionList { sessions: page, next_after }).reply(to.request_id)
                }
                Err(e) => store_error_frame(&to, &e),
            };
            Completion::Reply { to, frame }
        }
        Job::TouchSessions { sessions } => {
            if let Err(e) = store.touch_sessions(&sessions, now_ms()) {
                log::debug!("recording the last use of {} sessions failed: {e}", sessions.len());
            }
            return None;
        }
        Job::CreateRoom { to, actor, name, kind } => {
            match store.create_room(&name, kind, actor.user_id, &actor.name, now_ms(), settings.max_rooms_per_user) {
                Ok((room, delta)) => Completion::Membership {
                    to,
                    user_id: actor.user_id,
                    room: room.id,
                    joined: true,
                    published: Published::encode(room.id, std::slice::from_ref(&delta)),
                    frame: ServerFrame::RoomInfo(room_info(&room)).reply(to.request_id),
                },
                Err(e) => Completion::Reply { frame: store_error_frame(&to, &e), to },
            }
        }
        Job::Join { to, actor, room } => {
            match store.join_room(room, actor.user_id, &actor.name, now_ms(), settings.max_rooms_per_user) {
                Ok(delta) => match store.room(room) {
                    Ok(Some(rec)) => Completion::Membership {
                        to,
                        user_id: actor.user_id,
                        room,
                        joined: true,
                        published: delta.and_then(|d| Published::encode(room, &[d])),
                        frame: ServerFrame::RoomInfo(room_info(&rec)).reply(to.request_id),
                    },
                    Ok(None) => Completion::Reply { frame: error_frame(&to, ErrorCode::NOT_FOUND, "no such room"), to },
                    Err(e) => Completion::Reply { frame: store_error_frame(&to, &e), to },
                },
                Err(e) => Completion::Reply { frame: store_error_frame(&to, &e), to },
            }
        }
        Job::Leave { to, actor, room } => match store.leave_room(room, actor.user_id, &actor.name, now_ms()) {
            Ok(delta) => Completion::Membership {
                to,
                user_id: actor.user_id,
                room,
                joined: false,
                published: Published::encode(room, &[delta]),
                frame: ServerFrame::Done(Default::default()).reply(to.request_id),
            },
            Err(e) => Completion::Reply { frame: store_error_frame(&to, &e), to },
        },
        Job::ListRooms { to, actor, after_room, limit } => {
            match store.rooms_page(actor.user_id, after_room, limit.saturating_add(1)) {
                Ok(rooms) => {
                    let mut page: Vec<RoomInfo> = rooms.iter().map(room_info).collect();
                    let more = page.len() > limit as usize;
                    page.truncate(limit as usize);
                    let next_after = if more { page.last().map(|r| r.room) } else { None };
                    Completion::Reply {
                        frame: ServerFrame::RoomList(RoomList { rooms: page, next_after }).reply(to.request_id),
                        to,
                    }
                }
                Err(e) => Completion::Reply { frame: store_error_frame(&to, &e), to },
            }
        }
        Job::ListMembers { to, actor, room, after_user, limit } => {
            let frame = match store.is_member(room, actor.user_id) {
                Ok(false) => error_frame(&to, ErrorCode::NOT_MEMBER, format!("not a member of room {room}")),
                Err(e) => store_error_frame(&to, &e),
                Ok(true) => match store.members(room, after_user, limit.saturating_add(1)) {
                    Ok(mut members) => {
                        let more = members.len() > limit as usize;
                        members.truncate(limit as usize);
                        let next_after = if more { members.last().map(|m| m.user_id) } else { None };
                        ServerFrame::MemberList(MemberList {
                            room,
                            members: members
                                .into_iter()
                                .map(|m| MemberInfo { user_id: m.user_id, user: m.name, role: m.role })
                                .collect(),
                            next_after,
                        })
                        .reply(to.request_id)
                    }
                    Err(e) => store_error_frame(&to, &e),
                },
            };
            Completion::Reply { to, frame }
        }
        Job::Fetch { to, actor, room, after, limit, purpose } => fetch(store, to, &actor, room, after, limit, purpose),
        Job::Password { to, .. } | Job::Post { to, .. } => {
            Completion::Reply { frame: error_frame(&to, ErrorCode::INTERNAL, "job sent to the wrong queue"), to }
        }
        Job::Stop => return None,
    })
}

/// Upper bound on the text bytes in one page, so that a page of long messages stays far below
/// the maximum frame size.
const PAGE_TEXT_BUDGET: usize = 256 * 1024;

fn fetch(
    store: &mut dyn Store,
    to: ReplyTo,
    actor: &Actor,
    room: u64,
    after: u64,
    limit: u32,
    purpose: FetchPurpose,
) -> Completion {
    let failed = |error: ErrorBody, not_member| match purpose {
        FetchPurpose::History => Completion::Reply { to, frame: ServerFrame::Error(error).reply(to.request_id) },
        FetchPurpose::Sync(fetch) => Completion::PageFailed { to, room, fetch, not_member, error },
    };
    match store.is_member(room, actor.user_id) {
        Ok(true) => {}
        Ok(false) => {
            return failed(ErrorBody::new(ErrorCode::NOT_MEMBER, format!("not a member of room {room}")), true)
        }
        Err(e) => return failed(store_error(&e), false),
    }
    // One extra row tells whether more follow without a second query.
    let mut deltas = match store.deltas_after(room, after, limit.saturating_add(1)) {
        Ok(d) => d,
        Err(e) => return failed(store_error(&e), false),
    };
    let mut more = deltas.len() > limit as usize;
    deltas.truncate(limit as usize);
    let mut budget = 0usize;
    if let Some(cut) = deltas.iter().position(|d| {
        budget += d.text.len() + d.author.len();
        budget > PAGE_TEXT_BUDGET
    }) {
        deltas.truncate(cut.max(1));
        more = true;
    }
    match purpose {
        FetchPurpose::History => {
            let resume_after = deltas.last().map_or(after, |d| d.seq);
            let frame = ServerFrame::DeltaPage(DeltaPage { room, deltas, more, resume_after }).reply(to.request_id);
            Completion::Reply { to, frame }
        }
        FetchPurpose::Sync(fetch) => Completion::Page { to, room, fetch, deltas, more },
    }
}

fn logged_in(
    store: &mut dyn Store,
    to: ReplyTo,
    user_id: u64,
    name: String,
    session: SessionRecord,
    token: Option<String>,
) -> Completion {
    match store.rooms_of_user(user_id) {
        Ok(rooms) => Completion::LoggedIn {
            frame: ServerFrame::Authed(Authed { user_id, user: name.clone(), token }).reply(to.request_id),
            to,
            user_id,
            name,
            session,
            rooms: rooms.iter().map(|r| (r.id, r.last_seq)).collect(),
        },
        Err(e) => Completion::Reply { frame: store_error_frame(&to, &e), to },
    }
}

fn auth_main(mut slot: StoreSlot, rx: Receiver<Job>, settings: &Settings, notify: &Notify) {
    // One argon2 working area for the thread's life (see `auth::Hasher`).
    let mut hasher = auth::Hasher::default();
    loop {
        slot.maintain();
        let job = match rx.recv_timeout(slot.wait()) {
            Ok(job) => job,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let done = match job {
            Job::Stop => return,
            Job::Password { to, register, user, password, ip, user_agent } => {
                Some(password_login(&mut slot, &mut hasher, to, register, user, &password, ip, user_agent))
            }
            other => run_job(&mut slot, settings, other),
        };
        notify.send_all(done);
    }
}

#[allow(clippy::too_many_arguments)] // The fields of one `Job::Password`, unpacked.
fn password_login(
    store: &mut dyn Store,
    hasher: &mut auth::Hasher,
    to: ReplyTo,
    register: bool,
    user: String,
    password: &str,
    ip: String,
    user_agent: String,
) -> Completion {
    let fail = |code, msg: &str| Completion::Reply { frame: error_frame(&to, code, msg), to };
    let record = if register {
        let hash = match hasher.hash(password) {
            Ok(h) => h,
            Err(e) => {
                log::error!("hashing a password failed: {e}");
                return fail(ErrorCode::INTERNAL, "could not hash the password");
            }
        };
        match store.create_user(&user, &hash) {
            Ok(u) => u,
            Err(StoreError::Conflict(_)) => return fail(ErrorCode::USER_EXISTS, "that user name is taken"),
            Err(e) => return Completion::Reply { frame: store_error_frame(&to, &e), to },
        }
    } else {
        match store.user_by_name(&user) {
            Ok(Some(u)) if hasher.verify(password, &u.password_hash) => u,
            Ok(_) => return fail(ErrorCode::AUTH_FAILED, "wrong user name or password"),
            Err(e) => return Completion::Reply { frame: store_error_frame(&to, &e), to },
        }
    };
    let token = auth::new_session_token();
    let token_hash = auth::token_hash(&token);
    let session = NewSession { user_id: record.id, token_hash, ip, user_agent, now_ms: now_ms() };
    match store.create_session(&session) {
        Ok(session) => logged_in(store, to, record.id, record.name, session, Some(token)),
        Err(e) => Completion::Reply { frame: store_error_frame(&to, &e), to },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chime_protocol::DeltaKind;

    fn delta(seq: u64) -> Delta {
        Delta { room: 7, seq, kind: DeltaKind::MESSAGE, author_id: 1, author: "a".into(), ts_ms: 0, text: "x".into() }
    }

    #[test]
    fn frames_after_slices_whole_frames() {
        let p = Published::encode(7, &[delta(5), delta(6), delta(7)]).expect("non-empty");
        assert_eq!(p.last_seq(), 7);
        assert_eq!(p.frames_after(0), p.frames);
        assert_eq!(p.frames_after(4), p.frames);
        let one = ServerFrame::Delta(delta(7)).reply(0);
        assert_eq!(p.frames_after(6), one);
        assert!(p.frames_after(7).is_empty());
        assert!(p.frames_after(100).is_empty());
    }

    /// SIGTERM ends with this: every worker must wake up, finish and exit.
    #[test]
    fn pool_shutdown_returns() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("t.db").display());
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = crossbeam_channel::bounded(16);
        let settings = Settings {
            workers: 2,
            auth_workers: 1,
            max_batch: 16,
            max_rooms_per_user: 10,
            session_limits: SessionLimits { idle_ms: 60_000, max_age_ms: 60_000 },
            busy_timeout: Duration::from_secs(5),
        };
        let pool = Pool::start(&url, settings, Notify { completions: tx, waker }).unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            pool.shutdown();
            let _ = done_tx.send(());
        });
        assert!(done_rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok(), "shutdown hung");
        drop(rx);
    }
}
