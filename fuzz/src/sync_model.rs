//! A model of the event loop driving one connection's [`SyncState`], and a client that checks
//! what the connection receives, for the `sync` fuzz target.
//!
//! # What is modelled
//!
//! Three rooms with their logs, and one user with one connection, which starts logged in, a member
//! of rooms 1 and 2 and subscribed to them. Each [`Op`] is one thing the real system can do next:
//!
//! - **Commit**: other members post 1-3 deltas to a room in one group commit, with short texts or
//!   texts of `MAX_TEXT` bytes (so that held pushes can overflow `HELD_BYTES`, and pages are cut
//!   by the worker's byte budget). **Join**/**Leave**:
//!   the user joins or leaves a room (a JOIN/LEAVE delta; the database's membership changes now).
//!   Each commit becomes an event queued for the loop, per room in commit order: a room's writes
//!   go to one shard worker, whose completions reach the loop in order (`worker.rs`, `work.rs`).
//! - **Publish**: the loop takes a room's next event, as the core's `Effect::Published` does: a batch is
//!   `publish`ed (pushed through `SyncState::push` to the connection if it is subscribed); a join
//!   first `subscribe_from`s the connection (a `catch_up` if the loop has published past the
//!   JOIN's predecessor), then publishes; a leave publishes, then `unsubscribe`s (`forget`, whose
//!   actions are applied: it may end a SYNC). So every commit is pushed exactly once, in order,
//!   before, between or after any pages.
//! - **Sync**: the client sends SYNC (fresh request ids, any cursors, including past the head and
//!   for rooms it is not in; page sizes 0-3), answered by `SyncState::start`.
//! - The loop's `apply`: `Send` and `Push` go to the client; a `Fetch` is submitted to the workers
//!   if `can_fetch` (at most [`SHARED_WINDOW`] of the connection's fetches in flight, and no
//!   **Congestion**: the client not reading or the database down), else deferred; a `FetchLater`
//!   (after a failure) is always deferred. **Retry** is `retry_deferred` (a timer tick, a flush):
//!   deferred fetches go oldest first while `can_fetch`, those the machine no longer `wants`
//!   dropped. A fetch's result frees its slot and retries deferred ones too (`answered`), before
//!   the result itself is applied.
//! - **Read**/**Complete**: a worker reads one of the fetches in flight, carrying its fetch id,
//!   from the log as it is at that moment, honouring `after` and `limit`, `more` set as
//!   `handlers/sync.rs` (`FetchJob::run`) sets it (including a page cut short by the byte budget, with `more`
//!   true); or finds the user is not a member (`skip_room`); or the database fails (`page_failed`
//!   with the worker's UNAVAILABLE error). The result reaches the machine later, with its fetch id,
//!   while anything else happens in between: results of replaced fetches (an earlier SYNC or page
//!   of the room) are delivered as the loop delivers them, and the machine must ignore them.
//! - **Logout** (the loop restarts the sync state, which keeps counting fetch ids; its fetches in
//!   flight still answer the same connection, and the loop hands their results to whatever sync
//!   state the connection has by then), then **LoginRead** (the worker reads the user's rooms and heads) and **LoginDone** (the
//!   loop subscribes the connection with `subscribe_from` each room at the head read, which calls
//!   `catch_up` when the loop has already published past it).
//!
//! At the end the system settles: pending logins and events are delivered, congestion ends, and
//! every fetch is answered (deferred ones retried) from the final log, until the machine asks
//! for nothing more.
//!
//! # What is checked
//!
//! Every frame the connection is sent is decoded, and the client checks, per room:
//! - every delta is the log's delta with that seq; it continues the client's cursor (set by a
//!   SYNC, or "at most the head read" at login and just before its JOIN) with no gap and no
//!   duplicate, also after a failed fetch (the room's deltas then arrive as pushes);
//! - no push of a room arrives while it waits for the final page of a SYNC (not between pages);
//! - a `DELTA_PAGE` answers the SYNC the room is waiting on, `resume_after` is where it ends;
//! - `SYNC_DONE` answers an open SYNC, after every final page, with `heads` = the client's cursors
//!   of exactly the SYNC's rooms, leaving out rooms refused as not-member, left, or named by a
//!   later SYNC;
//! - an ERROR comes exactly when the fetch a SYNC's room waits for fails, with that SYNC's request
//!   id and the worker's error (UNAVAILABLE), or finds the SYNC's cursor past the room's head
//!   (CURSOR_AHEAD: the room is dropped from the SYNC and goes live);
//! - `Action::Push` carries only `DELTA` frames, a slice of a published batch (shared, not
//!   copied);
//! - once settled, every SYNC was answered, nothing is deferred or held, and every room the
//!   connection is subscribed to (and the user is a member of) was delivered up to the log's head.
//!
//! Deltas of rooms whose membership is changing (the user is not a member, or its JOIN/LEAVE has
//! not reached the loop yet) are not held to the gap and duplicate rules: leaving and joining race
//! with a SYNC in ways the protocol does not promise anything about.
//!
//! The bugs this target found in older versions of `sync.rs` are kept as
//! `fuzz/corpus/sync/regression-*` inputs (docs/fuzzing.md).

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use chime_protocol::{
    CreateBody, Delta, DeltaBody, DeltaKind, ErrorBody, ErrorCode, FrameDecoder, RoomCursor, RoomId, Seq, ServerFrame,
    UserId,
};
use chimed::limits::MAX_TEXT;
use chimed::sync::{Action, FetchId, SyncState};
use chimed::work::Published;
use std::collections::VecDeque;

/// Rooms 1 to `ROOMS`.
const ROOMS: usize = 3;
/// Operations taken from one input; the rest is ignored.
const MAX_OPS: usize = 256;
/// A room's log stops growing here, to keep runs fast.
const MAX_SEQ: usize = 64;
/// Rounds of answering fetches before the end is declared a livelock.
const SETTLE_ROUNDS: usize = 1000;
/// The connection's fetches in flight at most (`limits::SHARED_WINDOW`).
const SHARED_WINDOW: usize = 4;
/// Text bytes (and author names) after which a worker cuts a page (`limits::PAGE_TEXT_BUDGET`).
const PAGE_TEXT_BUDGET: usize = 256 * 1024;

/// The user's id and name on its own JOIN/LEAVE deltas.
const ME: (u64, &str) = (1, "me");

/// One step of the system, chosen by the fuzzer. Room selectors are taken modulo the room count.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// Other members commit `1 + n % 3` deltas to a room in one group commit, with texts of the
    /// largest size (`MAX_TEXT`) when `n >= 128`, so that held pushes can reach `HELD_BYTES`.
    Commit {
        /// Room selector.
        room: u8,
        /// Batch size and text size selector.
        n: u8,
    },
    /// The loop receives the room's next committed event (a batch, a join or a leave).
    Publish {
        /// Room selector.
        room: u8,
    },
    /// The user joins the room (a no-op if it is a member).
    Join {
        /// Room selector.
        room: u8,
    },
    /// The user leaves the room (a no-op if it is not a member).
    Leave {
        /// Room selector.
        room: u8,
    },
    /// The client sends SYNC. Each cursor is a room selector and a seq selector (taken modulo
    /// the room's head + 3, so cursors past the head occur too).
    Sync {
        /// Cursors.
        cursors: Vec<(u8, u8)>,
        /// Page size, modulo 4 (0 is the server's default).
        page_size: u8,
    },
    /// A worker reads one of the fetches in flight not yet read (selector modulo their number).
    Read {
        /// Fetch selector.
        fetch: u8,
        /// What the read finds.
        how: ReadHow,
    },
    /// The loop receives the result of one of the fetches already read.
    Complete {
        /// Fetch selector.
        fetch: u8,
    },
    /// The connection logs out (its sync state is dropped).
    Logout,
    /// A login's worker reads the user's rooms and their heads.
    LoginRead,
    /// The loop receives that login's result.
    LoginDone,
    /// The loop may not submit SYNC fetches from now on (`on`: the client is not reading what it
    /// was sent, or the database is down), or may again.
    Congestion {
        /// Whether fetches must wait.
        on: bool,
    },
    /// The loop retries the connection's deferred fetches (`retry_deferred`: a timer tick, a
    /// flush).
    Retry,
}

/// How a fetch's read goes, if the user is a member.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum ReadHow {
    /// The page as the limit allows.
    Whole,
    /// The byte budget cuts the page to `1 + n % len` deltas (`more` is then true).
    Cut(u8),
    /// The database fails.
    DbError,
}

/// Runs the ops, settles, and checks; panics on any broken promise.
pub fn run(ops: &[Op]) {
    let mut m = Model::new();
    for op in ops.iter().take(MAX_OPS) {
        m.step(op);
    }
    m.settle();
}

fn room_of(sel: u8) -> u64 {
    u64::from(sel) % ROOMS as u64 + 1
}

fn known_room(room: impl Into<u64>) {
    let room: u64 = room.into();
    assert!((1..=ROOMS as u64).contains(&room), "the connection is sent room {room}, which nobody named");
}

fn ix(room: impl Into<u64>) -> usize {
    (room.into() - 1) as usize
}

/// What the worker sends when the database fails (`work.rs::store_error` for
/// `StoreError::Unavailable`).
fn db_error() -> ErrorBody {
    ErrorBody::new(ErrorCode::UNAVAILABLE, "the database is unavailable; retry shortly")
}

/// A committed change not yet seen by the loop.
#[derive(Debug, Clone, Copy)]
enum Event {
    Posts { first: u64, last: u64 },
    Joined(u64),
    Left(u64),
}

/// One room in the database, and what the loop knows of it.
#[derive(Debug)]
struct Room {
    /// The delta at each seq (seq 1 first), built once: pages and checks copy or compare them.
    log: Vec<Delta>,
    /// Whether the user is a member, in the database.
    member: bool,
    /// Committed, not yet received by the loop.
    unpublished: VecDeque<Event>,
    /// The loop's `room_heads` entry.
    published: u64,
    /// Every batch published, so that a `Push` can be checked to be a slice of one.
    batches: Vec<Published>,
}

impl Room {
    fn head(&self) -> u64 {
        self.log.len() as u64
    }
}

/// A fetch submitted to the workers (a `Job::Fetch` of the connection, in flight).
#[derive(Debug)]
struct Fetch {
    room: u64,
    after: u64,
    limit: u32,
    /// The id the job carries back.
    id: FetchId,
    /// The [`Model::session`] whose sync state asked for it (the job itself does not say).
    session: u32,
    read: Option<Outcome>,
}

#[derive(Debug)]
enum Outcome {
    Page(Vec<Delta>, bool),
    NotMember,
    /// The fetch's cursor is past the room's head.
    Ahead,
    DbError,
}

/// The connection, as the loop keeps it.
#[derive(Debug, Default)]
struct Conn {
    authed: bool,
    subscribed: [bool; ROOMS],
    /// Its deferred fetches are `sync.deferred`, as in the loop.
    sync: Option<SyncState>,
    /// A login read by its worker, not yet completed: (room, head).
    login: Option<Vec<(u64, u64)>>,
    /// Per room, the fetch the machine waits for, as ([`Model::session`], id): the last one it
    /// asked for (again, for a `FetchLater`), until answered or the room is dropped. Only the
    /// model's bookkeeping, to know when an ERROR is due; the machine keeps its own.
    waiting: [Option<(u32, FetchId)>; ROOMS],
}

/// Where the client stands in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cursor {
    /// Nothing to check until a delta arrives.
    Unknown,
    /// The next delta may start anywhere up to this + 1 (a subscription at a head read earlier).
    AtMost(u64),
    /// The next delta must be this + 1.
    Exactly(u64),
}

/// The client's view of one room.
#[derive(Debug, Clone, Copy)]
struct View {
    cursor: Cursor,
    /// The SYNC whose final page this room waits for.
    pages: Option<u32>,
}

/// A SYNC the client is waiting on.
#[derive(Debug)]
struct OpenSync {
    id: u32,
    /// The rooms whose heads SYNC_DONE must report: those named, less the ones refused as
    /// not-member, left, or named again by a later SYNC.
    rooms: Vec<u64>,
}

/// The client: what it has received, checked as it arrives.
#[derive(Debug)]
struct Client {
    views: [View; ROOMS],
    open: Vec<OpenSync>,
    next_id: u32,
    /// The SYNC whose ERROR the failure being applied must produce, and its code.
    expect_error: Option<(u32, ErrorCode)>,
}

impl Client {
    /// The room no longer belongs to any open SYNC (refused, left, or named by a new SYNC).
    fn drop_from_open(&mut self, room: u64) {
        for open in &mut self.open {
            open.rooms.retain(|&r| r != room);
        }
    }
}

struct Model {
    rooms: Vec<Room>,
    conn: Conn,
    /// The connection's fetches in flight, from any of its sync states.
    fetches: Vec<Fetch>,
    /// Bumped each time the connection's sync state is dropped (logout).
    session: u32,
    /// [`Op::Congestion`]: `can_fetch` is false.
    congested: bool,
    client: Client,
}

/// The delta at `seq`; `big` gives it a text of `MAX_TEXT` bytes.
fn delta_of(room: u64, seq: u64, kind: DeltaKind, big: bool) -> Delta {
    // The user's own deltas are its JOINs and LEAVEs; the messages are someone else's.
    let (author_id, author) = if kind == DeltaKind::MESSAGE { (2, "ann") } else { ME };
    let mut text = if kind == DeltaKind::MESSAGE { format!("{room}/{seq}") } else { String::new() };
    if big {
        text.push_str(&"x".repeat(MAX_TEXT - text.len()));
    }
    let body = match kind {
        DeltaKind::MESSAGE => DeltaBody::message(text),
        DeltaKind::JOIN => DeltaBody::Join,
        DeltaKind::LEAVE => DeltaBody::Leave,
        _ => DeltaBody::Create(CreateBody { name: text }),
    };
    Delta {
        room: RoomId(room),
        seq: Seq(seq),
        author_id: UserId(author_id),
        author: author.into(),
        ts_ms: seq as i64 * 1000,
        body,
    }
}

impl Model {
    fn new() -> Model {
        // Some history, all of it published; the connection logged in at these heads.
        let rooms = [(3, true), (1, true), (2, false)]
            .into_iter()
            .enumerate()
            .map(|(i, (n, member))| Room {
                log: (1..=n).map(|seq| delta_of(i as u64 + 1, seq, DeltaKind::MESSAGE, false)).collect(),
                member,
                unpublished: VecDeque::new(),
                published: n as u64,
                batches: Vec::new(),
            })
            .collect::<Vec<_>>();
        let mut views = [View { cursor: Cursor::Unknown, pages: None }; ROOMS];
        let mut conn = Conn { authed: true, ..Conn::default() };
        for (i, r) in rooms.iter().enumerate() {
            if r.member {
                conn.subscribed[i] = true;
                views[i].cursor = Cursor::AtMost(r.head());
            }
        }
        let client = Client { views, open: Vec::new(), next_id: 1, expect_error: None };
        Model { rooms, conn, fetches: Vec::new(), session: 0, congested: false, client }
    }

    fn room(&self, room: u64) -> &Room {
        &self.rooms[ix(room)]
    }

    fn delta(&self, room: u64, seq: u64) -> &Delta {
        &self.room(room).log[(seq - 1) as usize]
    }

    fn deltas(&self, room: u64, seqs: std::ops::RangeInclusive<u64>) -> &[Delta] {
        if seqs.is_empty() {
            return &[];
        }
        &self.room(room).log[(*seqs.start() - 1) as usize..*seqs.end() as usize]
    }

    /// Whether the room's membership is changing or absent, so its deltas are not checked.
    fn exempt(&self, room: u64) -> bool {
        let r = self.room(room);
        !r.member || r.unpublished.iter().any(|e| !matches!(e, Event::Posts { .. }))
    }

    fn commit(&mut self, room: u64, kind: DeltaKind, big: bool, n: usize) -> Option<u64> {
        let r = &mut self.rooms[ix(room)];
        if r.log.len() + n > MAX_SEQ {
            return None;
        }
        let first = r.head() + 1;
        r.log.extend((first..first + n as u64).map(|seq| delta_of(room, seq, kind, big)));
        Some(first)
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Commit { room, n } => {
                let room = room_of(room);
                let big = n >= 128;
                let n = 1 + usize::from(n % 3);
                if let Some(first) = self.commit(room, DeltaKind::MESSAGE, big, n) {
                    let last = first + n as u64 - 1;
                    self.rooms[ix(room)].unpublished.push_back(Event::Posts { first, last });
                }
            }
            Op::Publish { room } => self.publish_next(room_of(room)),
            Op::Join { room } => {
                let room = room_of(room);
                if !self.room(room).member {
                    if let Some(seq) = self.commit(room, DeltaKind::JOIN, false, 1) {
                        self.rooms[ix(room)].member = true;
                        self.rooms[ix(room)].unpublished.push_back(Event::Joined(seq));
                    }
                }
            }
            Op::Leave { room } => {
                let room = room_of(room);
                if self.room(room).member {
                    if let Some(seq) = self.commit(room, DeltaKind::LEAVE, false, 1) {
                        self.rooms[ix(room)].member = false;
                        self.rooms[ix(room)].unpublished.push_back(Event::Left(seq));
                    }
                }
            }
            Op::Sync { ref cursors, page_size } => self.sync(cursors, u32::from(page_size % 4)),
            Op::Read { fetch, how } => {
                let unread: Vec<usize> = (0..self.fetches.len()).filter(|&i| self.fetches[i].read.is_none()).collect();
                if !unread.is_empty() {
                    let i = unread[usize::from(fetch) % unread.len()];
                    self.read(i, how);
                }
            }
            Op::Complete { fetch } => {
                let read: Vec<usize> = (0..self.fetches.len()).filter(|&i| self.fetches[i].read.is_some()).collect();
                if !read.is_empty() {
                    let i = read[usize::from(fetch) % read.len()];
                    self.complete(i);
                }
            }
            Op::Logout => self.logout(),
            Op::LoginRead => {
                if !self.conn.authed && self.conn.login.is_none() {
                    let rooms =
                        (1..=ROOMS as u64).filter(|&r| self.room(r).member).map(|r| (r, self.room(r).head())).collect();
                    self.conn.login = Some(rooms);
                }
            }
            Op::LoginDone => self.login_done(),
            Op::Congestion { on } => self.congested = on,
            Op::Retry => self.retry_deferred(),
        }
    }

    // ---- The loop (core/mod.rs), for this one connection ----

    /// `complete` for the room's next event.
    fn publish_next(&mut self, room: u64) {
        let Some(event) = self.rooms[ix(room)].unpublished.pop_front() else { return };
        match event {
            Event::Posts { first, last } => self.publish(room, first, last),
            Event::Joined(seq) => {
                if self.conn.authed {
                    let v = &mut self.client.views[ix(room)];
                    // "A user who joins a room receives its deltas from the JOIN on", unless a
                    // SYNC it sent (or deltas it received) already set where the room continues.
                    if v.cursor == Cursor::Unknown {
                        v.cursor = Cursor::AtMost(seq - 1);
                    }
                    self.subscribe_from(room, seq - 1);
                }
                self.publish(room, seq, seq);
            }
            Event::Left(seq) => {
                self.publish(room, seq, seq);
                if self.conn.authed {
                    self.unsubscribe(room);
                }
            }
        }
    }

    /// `publish`: fan-out of one committed batch.
    fn publish(&mut self, room: u64, first: u64, last: u64) {
        let p = Published::encode(RoomId(room), &self.deltas(room, first..=last)).expect("a non-empty batch");
        let r = &mut self.rooms[ix(room)];
        r.published = r.published.max(last);
        r.batches.push(p.clone());
        if !self.conn.subscribed[ix(room)] {
            return;
        }
        match self.conn.sync.as_mut() {
            None => self.receive(&p.frames, true),
            Some(sync) => {
                let actions = sync.push(&p);
                self.apply(actions);
            }
        }
    }

    /// `subscribe_from`.
    fn subscribe_from(&mut self, room: u64, after: u64) {
        if self.conn.subscribed[ix(room)] {
            // It has received every push since it subscribed.
            return;
        }
        self.conn.subscribed[ix(room)] = true;
        if self.room(room).published > after {
            let actions = self.conn.sync.get_or_insert_with(Default::default).catch_up(RoomId(room), Seq(after));
            self.apply(actions);
        }
    }

    /// `unsubscribe`: the user left the room.
    fn unsubscribe(&mut self, room: u64) {
        self.conn.subscribed[ix(room)] = false;
        // The client forgets the room, and no SYNC reports it any more.
        self.client.views[ix(room)] = View { cursor: Cursor::Unknown, pages: None };
        self.client.drop_from_open(room);
        self.conn.waiting[ix(room)] = None;
        if let Some(sync) = self.conn.sync.as_mut() {
            let actions = sync.forget(RoomId(room));
            self.apply(actions);
        }
    }

    /// `apply`: sends go to the client, fetches to the workers or to the deferred queue.
    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send(bytes) => self.receive(&bytes, false),
                Action::Push(bytes) => self.receive(&bytes, true),
                Action::FetchLater { room, after, limit, fetch } => {
                    known_room(room);
                    self.conn.waiting[ix(room)] = Some((self.session, fetch));
                    self.defer(Action::Fetch { room, after, limit, fetch });
                }
                Action::Fetch { room, fetch, .. } => {
                    known_room(room);
                    self.conn.waiting[ix(room)] = Some((self.session, fetch));
                    if self.can_fetch() {
                        self.submit(a);
                    } else {
                        self.defer(a);
                    }
                }
            }
        }
    }

    /// `can_fetch`: a free slot in the connection's window, and no congestion.
    fn can_fetch(&self) -> bool {
        !self.congested && self.fetches.len() < SHARED_WINDOW
    }

    /// `fetch`: a job to the workers.
    fn submit(&mut self, fetch: Action) {
        let Action::Fetch { room, after, limit, fetch: id } = fetch else { return };
        self.fetches.push(Fetch { room: room.get(), after: after.get(), limit, id, session: self.session, read: None });
    }

    /// `defer`.
    fn defer(&mut self, fetch: Action) {
        if let Some(sync) = self.conn.sync.as_mut() {
            sync.deferred.push_back(fetch);
        }
    }

    /// `retry_deferred`: oldest first while fetches may go, skipping replaced ones.
    fn retry_deferred(&mut self) {
        while self.can_fetch() {
            let Some(sync) = self.conn.sync.as_mut() else { return };
            let Some(next) = sync.deferred.pop_front() else { return };
            if let Action::Fetch { room, fetch, .. } = next {
                if sync.wants(room, fetch) {
                    self.submit(next);
                }
            }
        }
    }

    fn sync(&mut self, cursors: &[(u8, u8)], page_size: u32) {
        if !self.conn.authed {
            return;
        }
        let cursors: Vec<RoomCursor> = cursors
            .iter()
            .take(2 * ROOMS)
            .map(|&(room, seq)| {
                let room = room_of(room);
                RoomCursor { room: RoomId(room), seq: Seq(u64::from(seq) % (self.room(room).head() + 3)) }
            })
            .collect();
        let id = self.client.next_id;
        self.client.next_id += 1;
        let mut rooms = Vec::new();
        for c in &cursors {
            let (room, seq) = (c.room.get(), c.seq.get());
            if rooms.contains(&room) {
                continue;
            }
            rooms.push(room);
            // The room moves from an earlier, unfinished SYNC to this one.
            self.client.drop_from_open(room);
            self.client.views[ix(room)] = View { cursor: Cursor::Exactly(seq), pages: Some(id) };
        }
        self.client.open.push(OpenSync { id, rooms });
        let actions = self.conn.sync.get_or_insert_with(Default::default).start(id, &cursors, page_size);
        self.apply(actions);
    }

    // ---- The workers (handlers/sync.rs, `FetchJob::run`) ----

    fn read(&mut self, i: usize, how: ReadHow) {
        let f = &self.fetches[i];
        // As `FetchJob::run`: the membership check, then the read, either of which may fail.
        let outcome = if matches!(how, ReadHow::DbError) {
            Outcome::DbError
        } else if !self.room(f.room).member {
            Outcome::NotMember
        } else {
            let head = self.room(f.room).head();
            let available = head.saturating_sub(f.after);
            let n = available.min(u64::from(f.limit));
            if f.after > head {
                // A cursor past the head is refused, naming the head.
                self.fetches[i].read = Some(Outcome::Ahead);
                return;
            }
            let mut deltas = self.deltas(f.room, f.after + 1..=f.after + n).to_vec();
            let mut more = available > u64::from(f.limit);
            // The byte budget, as the worker applies it (at least one delta per page).
            let mut budget = 0;
            if let Some(cut) = deltas.iter().position(|d| {
                budget += d.body.text().map_or(0, str::len) + d.author.len();
                budget > PAGE_TEXT_BUDGET
            }) {
                deltas.truncate(cut.max(1));
                more = true;
            }
            match how {
                // Cut shorter still, as a smaller budget would.
                ReadHow::Cut(k) if !deltas.is_empty() => {
                    deltas.truncate(1 + usize::from(k) % deltas.len());
                    Outcome::Page(deltas, true)
                }
                _ => Outcome::Page(deltas, more),
            }
        };
        self.fetches[i].read = Some(outcome);
    }

    /// `complete` for `Completion::Page` / `PageFailed`.
    fn complete(&mut self, i: usize) {
        let f = self.fetches.remove(i);
        let Some(outcome) = f.read else { return };
        // `answered`: the slot is free, deferred fetches may go.
        self.retry_deferred();
        let Some(sync) = self.conn.sync.as_mut() else { return };
        // Whether the machine waits for this very fetch. The loop cannot tell (a fetch of a sync
        // state dropped at logout answers the connection's next one), so this is only for the
        // client's expectations; the result goes to the machine either way.
        let current = self.conn.waiting[ix(f.room)] == Some((f.session, f.id));
        let actions = match outcome {
            Outcome::Page(deltas, more) => {
                if current {
                    // Answered; a next page, if any, is asked for by the actions.
                    self.conn.waiting[ix(f.room)] = None;
                }
                sync.page(RoomId(f.room), f.id, deltas, more)
            }
            Outcome::NotMember => {
                if current {
                    self.conn.waiting[ix(f.room)] = None;
                    // Left out of its SYNC (if any): the client forgets the room.
                    self.client.views[ix(f.room)] = View { cursor: Cursor::Unknown, pages: None };
                    self.client.drop_from_open(f.room);
                }
                sync.skip_room(RoomId(f.room), f.id)
            }
            Outcome::Ahead => {
                if current {
                    self.conn.waiting[ix(f.room)] = None;
                    // The room's SYNC, if it still waits for this room, ends with CURSOR_AHEAD;
                    // the room is dropped from it and goes live; the client must SYNC it again.
                    let v = &mut self.client.views[ix(f.room)];
                    self.client.expect_error = v.pages.map(|id| (id, ErrorCode::CURSOR_AHEAD));
                    *v = View { cursor: Cursor::Unknown, pages: None };
                    self.client.drop_from_open(f.room);
                }
                let error = ErrorBody::new(ErrorCode::CURSOR_AHEAD, format!("cursor {} is past the head", f.after));
                sync.reject_room(RoomId(f.room), f.id, error)
            }
            Outcome::DbError => {
                if current {
                    // The room's SYNC, if it still waits for this room, ends with an ERROR; the
                    // room keeps catching up (a `FetchLater`), its deltas to come as pushes.
                    self.client.expect_error =
                        self.client.views[ix(f.room)].pages.map(|id| (id, ErrorCode::UNAVAILABLE));
                }
                sync.page_failed(RoomId(f.room), f.id, db_error())
            }
        };
        self.apply(actions);
        assert_eq!(self.client.expect_error.take(), None, "a SYNC's fetch failed but no ERROR was sent");
    }

    fn logout(&mut self) {
        if !self.conn.authed {
            return;
        }
        // The loop restarts the sync state rather than dropping it, so that fetch ids keep
        // counting: results of this session's fetches still in flight must not answer the next.
        let sync = self.conn.sync.take().map(|mut s| {
            s.restart();
            s
        });
        self.conn = Conn { sync, ..Conn::default() };
        self.session += 1;
        for v in &mut self.client.views {
            *v = View { cursor: Cursor::Unknown, pages: None };
        }
        self.client.open.clear();
    }

    fn login_done(&mut self) {
        let Some(rooms) = self.conn.login.take() else { return };
        self.conn.authed = true;
        for (room, head) in rooms {
            self.client.views[ix(room)] = View { cursor: Cursor::AtMost(head), pages: None };
            self.subscribe_from(room, head);
        }
    }

    // ---- The end ----

    fn settle(&mut self) {
        self.login_done();
        for room in 1..=ROOMS as u64 {
            while !self.room(room).unpublished.is_empty() {
                self.publish_next(room);
            }
        }
        self.congested = false;
        let mut rounds = 0;
        loop {
            self.retry_deferred();
            if self.fetches.is_empty() {
                break;
            }
            rounds += 1;
            assert!(rounds <= SETTLE_ROUNDS, "the machine keeps fetching: {:?}", self.fetches);
            if self.fetches[0].read.is_none() {
                self.read(0, ReadHow::Whole);
            }
            self.complete(0);
        }
        if let Some(sync) = &self.conn.sync {
            assert!(sync.deferred.is_empty(), "fetches still deferred: {:?}", sync.deferred);
            assert_eq!(sync.held_bytes(), 0, "pushes still held once every fetch was answered");
        }
        for open in &self.client.open {
            panic!("SYNC {} was never answered (rooms {:?})", open.id, open.rooms);
        }
        for room in 1..=ROOMS as u64 {
            let r = self.room(room);
            if !self.conn.authed || !self.conn.subscribed[ix(room)] || !r.member {
                continue;
            }
            let v = self.client.views[ix(room)];
            assert_eq!(v.pages, None, "room {room} still waits for a final page");
            let head = r.head();
            if let Cursor::AtMost(c) | Cursor::Exactly(c) = v.cursor {
                assert!(c >= head, "room {room}: the client has up to {c} of {head} ({:?})", v.cursor);
            }
        }
    }

    // ---- The client ----

    /// Decodes and checks what one action (or one publish) sent; `push` for shared bytes
    /// (`Action::Push`, or a batch queued as is).
    fn receive(&mut self, bytes: &Bytes, push: bool) {
        if push {
            self.check_shared(bytes);
        }
        let decoder = FrameDecoder::default();
        let mut buf = BytesMut::from(&bytes[..]);
        while let Some(raw) = decoder.decode(&mut buf).expect("the connection is sent valid frames") {
            let frame = ServerFrame::decode(&raw).expect("the connection is sent valid bodies");
            if push {
                assert!(matches!(frame, ServerFrame::Delta(_)), "a push of published frames holds {frame:?}");
            }
            self.frame(raw.request_id, frame);
        }
        assert!(buf.is_empty(), "a send ends in a partial frame: {buf:02x?}");
    }

    /// A push is a non-empty tail of a published batch, in that batch's memory.
    fn check_shared(&self, bytes: &Bytes) {
        assert!(!bytes.is_empty(), "an empty push");
        let (start, end) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
        let shared = self.rooms.iter().flat_map(|r| &r.batches).any(|p| {
            let (p_start, p_end) = (p.frames.as_ptr() as usize, p.frames.as_ptr() as usize + p.frames.len());
            p_start <= start && end == p_end
        });
        assert!(shared, "a push that is not the tail of a published batch: {bytes:02x?}");
    }

    fn frame(&mut self, id: u32, frame: ServerFrame) {
        match frame {
            ServerFrame::Delta(d) => {
                assert_eq!(id, 0, "a DELTA push carries request id 0");
                known_room(d.room);
                let v = self.client.views[ix(d.room)];
                assert_eq!(v.pages, None, "a push for room {} between the pages of SYNC {:?}", d.room, v.pages);
                self.accept(&d);
            }
            ServerFrame::DeltaPage(p) => {
                known_room(p.room);
                let v = self.client.views[ix(p.room)];
                assert_eq!(v.pages, Some(id), "a page of room {} for SYNC {id}", p.room);
                for d in &p.deltas {
                    assert_eq!(d.room, p.room, "a page of room {} holds a delta of room {}", p.room, d.room);
                    self.accept(d);
                }
                let v = &mut self.client.views[ix(p.room)];
                assert_eq!(
                    v.cursor,
                    Cursor::Exactly(p.resume_after.get()),
                    "room {}: resume_after {} but the page ends at {:?}",
                    p.room,
                    p.resume_after,
                    v.cursor
                );
                if !p.more {
                    v.pages = None;
                }
            }
            ServerFrame::SyncDone(done) => {
                let Some(i) = self.client.open.iter().position(|o| o.id == id) else {
                    panic!("SYNC_DONE for {id}, which is not an open SYNC");
                };
                let open = self.client.open.remove(i);
                for (k, h) in done.heads.iter().enumerate() {
                    known_room(h.room);
                    assert!(
                        open.rooms.contains(&h.room.get()),
                        "SYNC_DONE {id} reports room {} it does not cover",
                        h.room
                    );
                    assert!(
                        !done.heads[..k].iter().any(|o| o.room == h.room),
                        "SYNC_DONE {id} reports room {} twice",
                        h.room
                    );
                    let v = self.client.views[ix(h.room)];
                    assert_eq!(v.pages, None, "SYNC_DONE {id} before room {}'s final page", h.room);
                    assert_eq!(v.cursor, Cursor::Exactly(h.seq.get()), "SYNC_DONE {id}'s head of room {}", h.room);
                }
                for &room in &open.rooms {
                    assert!(done.heads.iter().any(|h| h.room.get() == room), "SYNC_DONE {id} leaves out room {room}");
                }
            }
            ServerFrame::Error(e) => {
                let Some((sync, code)) = self.client.expect_error.take() else {
                    panic!("an unexpected ERROR (request id {id}): {e}");
                };
                assert_eq!(id, sync, "the ERROR ending SYNC {sync} has request id {id}");
                assert_eq!(e.code, code, "the ERROR ending SYNC {sync}: {e}");
                if code == ErrorCode::UNAVAILABLE {
                    assert_eq!(e, db_error(), "the ERROR ending SYNC {sync} is not the worker's");
                }
                assert!(self.client.open.iter().any(|o| o.id == sync), "an ERROR for SYNC {sync}, not open");
                self.client.open.retain(|o| o.id != sync);
                // Its rooms continue from where their pages ended, their deltas arriving as pushes.
                for v in &mut self.client.views {
                    if v.pages == Some(sync) {
                        v.pages = None;
                    }
                }
            }
            other => panic!("the sync machine sent {other:?}"),
        }
    }

    /// One delta reaches the client.
    fn accept(&mut self, d: &Delta) {
        known_room(d.room);
        let (room, seq) = (d.room.get(), d.seq.get());
        assert!(seq >= 1 && seq <= self.room(room).head(), "room {room} has no seq {seq}");
        assert_eq!(d, self.delta(room, seq), "a delta that is not the log's");
        let exempt = self.exempt(room);
        let v = &mut self.client.views[ix(room)];
        if !exempt {
            match v.cursor {
                Cursor::Exactly(c) => assert_eq!(seq, c + 1, "room {room}: seq {seq} after {c}"),
                Cursor::AtMost(c) => assert!(seq <= c + 1, "room {room}: seq {seq} after at most {c}"),
                Cursor::Unknown => {}
            }
        }
        v.cursor = Cursor::Exactly(seq);
    }
}
