//! A model of the event loop driving one connection's [`SyncState`], and a client that checks
//! what the connection receives, for the `sync` fuzz target.
//!
//! # What is modelled
//!
//! Three rooms with their logs, and one user with one connection, which starts logged in, a member
//! of rooms 1 and 2 and subscribed to them. Each [`Op`] is one thing the real system can do next:
//!
//! - **Commit**: other members post 1-3 deltas to a room in one group commit. **Join**/**Leave**:
//!   the user joins or leaves a room (a JOIN/LEAVE delta; the database's membership changes now).
//!   Each commit becomes an event queued for the loop, per room in commit order: a room's writes
//!   go to one shard worker, whose completions reach the loop in order (`worker.rs`).
//! - **Publish**: the loop takes a room's next event, as `server.rs::complete` does: a batch is
//!   `publish`ed (pushed through `SyncState::push` to the connection if it is subscribed); a join
//!   first `subscribe_from`s the connection (a `catch_up` if the loop has published past the
//!   JOIN's predecessor), then publishes; a leave publishes, then unsubscribes (`forget`). So every
//!   commit is pushed exactly once, in order, before, between or after any pages.
//! - **Sync**: the client sends SYNC (fresh request ids, any cursors, including past the head and
//!   for rooms it is not in; page sizes 0-3), answered by `SyncState::start`.
//! - **Read**/**Complete**: a worker reads one of the fetches the machine asked for (`Action::Fetch`)
//!   from the log as it is at that moment, honouring `after` and `limit`, `more` set as
//!   `worker.rs::fetch` sets it (including a page cut short by the byte budget, with `more`
//!   true); or finds the user is not a member (`skip_room`); or the database fails
//!   (`page_failed`, with the ERROR frame the worker builds). The result reaches the machine
//!   later, while anything else happens in between. Results for a connection whose sync state was
//!   dropped (logout) are discarded, as the loop does.
//! - **Logout**, then **LoginRead** (the worker reads the user's rooms and heads) and
//!   **LoginDone** (the loop subscribes the connection with `subscribe_from` each room at the head
//!   read, which calls `catch_up` when the loop has already published past it).
//!
//! At the end the system settles: pending logins and events are delivered and every fetch is
//! answered from the final log, until the machine asks for nothing more.
//!
//! # What is checked
//!
//! Every frame the connection is sent is decoded, and the client checks, per room:
//! - every delta is the log's delta with that seq; it continues the client's cursor (set by a
//!   SYNC, or "at most the head read" at login and just before its JOIN) with no gap and no
//!   duplicate; pushes never arrive while the room still waits for the final page of a SYNC;
//! - a `DELTA_PAGE` answers the SYNC the room is waiting on, `resume_after` is the new cursor;
//! - `SYNC_DONE` answers an open SYNC, after every final page, with `heads` = the client's cursors,
//!   leaving out only rooms refused as not-member for that SYNC;
//! - an ERROR comes exactly when a SYNC's fetch fails, and carries that SYNC's request id;
//! - once settled, every SYNC was answered, the machine asks for nothing, and every room the
//!   connection is subscribed to (and the user is a member of) was delivered up to the log's head.
//!
//! Rooms whose membership is changing (the user is not a member, or its JOIN/LEAVE has not reached
//! the loop yet) are not held to the per-room rules: leaving and joining race with a SYNC in ways
//! the protocol does not promise anything about.
//!
//! # Known bugs
//!
//! Some cases the loop can produce break the promise (see docs/fuzzing.md). The target steps
//! around exactly those cases, so that it keeps looking for others, unless the environment
//! variable `CHIME_FUZZ_STRICT` names them (`all`, or a comma-separated list such as
//! `stale-page,left-room`); then `fuzz/corpus/sync/known-<name>` crashes. Each skip is marked
//! `KNOWN BUG` below; [`Known`] lists them.

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use chime_protocol::{Delta, DeltaKind, ErrorBody, ErrorCode, FrameDecoder, RoomCursor, ServerFrame};
use chimed::sync::{Action, SyncState};
use chimed::worker::Published;
use std::collections::VecDeque;
use std::sync::OnceLock;

/// Rooms 1 to `ROOMS`.
const ROOMS: usize = 3;
/// Operations taken from one input; the rest is ignored.
const MAX_OPS: usize = 256;
/// A room's log stops growing here, to keep runs fast.
const MAX_SEQ: usize = 64;
/// Rounds of answering fetches before the end is declared a livelock.
const SETTLE_ROUNDS: usize = 1000;

/// The user's id and name on its own JOIN/LEAVE deltas.
const ME: (u64, &str) = (1, "me");

/// One step of the system, chosen by the fuzzer. Room selectors are taken modulo the room count.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// Other members commit `1 + n % 3` deltas to a room in one group commit.
    Commit {
        /// Room selector.
        room: u8,
        /// Batch size selector.
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
    /// A worker reads one of the fetches not yet read (selector modulo their number).
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

/// A bug the target knows about and steps around unless asked not to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// `skip_room` and `page_failed` carry no cursor, so a failure for a fetch the machine no
    /// longer waits for (stale) ends the room's current SYNC or catch-up.
    StaleFailure,
    /// The ERROR ending a SYNC is the worker's frame for the fetch, whose request id is 0.
    ErrorId,
    /// `forget` leaves the room in its SYNC request: a room left before its final page keeps the
    /// SYNC open forever, and one left after is reported in `heads` at seq 0.
    LeftRoom,
    /// A final page's `resume_after` counts the held pushes flushed after it.
    ResumeAfter,
    /// A page for an earlier SYNC, catch-up or session of the room with the same `after` is
    /// taken as the current answer, though it was read before deltas that the current track
    /// never held (they were published while the room was untracked), so they are never sent.
    StalePage,
    /// A SYNC naming a room that already had its final page in an earlier, still open SYNC
    /// counts that room as done a second time in the earlier one, which then ends (SYNC_DONE)
    /// before its other rooms have had theirs.
    ResyncFinishedRoom,
}

impl Known {
    const ALL: [(Known, &'static str); 6] = [
        (Known::StaleFailure, "stale-failure"),
        (Known::StalePage, "stale-page"),
        (Known::ErrorId, "error-id"),
        (Known::LeftRoom, "left-room"),
        (Known::ResumeAfter, "resume-after"),
        (Known::ResyncFinishedRoom, "resync-finished-room"),
    ];
}

/// Whether to check `bug` rather than step around it: `CHIME_FUZZ_STRICT` is `all` or a
/// comma-separated list of the names in [`Known::ALL`].
fn strict(bug: Known) -> bool {
    static STRICT: OnceLock<Vec<Known>> = OnceLock::new();
    STRICT
        .get_or_init(|| {
            let var = std::env::var("CHIME_FUZZ_STRICT").unwrap_or_default();
            let names: Vec<&str> = var.split(',').map(str::trim).collect();
            Known::ALL.iter().filter(|(_, n)| names.contains(n) || names.contains(&"all")).map(|&(k, _)| k).collect()
        })
        .contains(&bug)
}

fn room_of(sel: u8) -> u64 {
    u64::from(sel) % ROOMS as u64 + 1
}

fn known_room(room: u64) {
    assert!((1..=ROOMS as u64).contains(&room), "the connection is sent room {room}, which nobody named");
}

fn ix(room: u64) -> usize {
    (room - 1) as usize
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
    /// The kind of delta at each seq (seq 1 first); the rest of a delta follows from the seq.
    kinds: Vec<(DeltaKind, bool)>,
    /// Whether the user is a member, in the database.
    member: bool,
    /// Committed, not yet received by the loop.
    unpublished: VecDeque<Event>,
    /// The loop's `room_heads` entry.
    published: u64,
}

impl Room {
    fn head(&self) -> u64 {
        self.kinds.len() as u64
    }
}

/// A fetch the machine asked for.
#[derive(Debug)]
struct Fetch {
    room: u64,
    after: u64,
    limit: u32,
    /// The room's [`View::epoch`] when it was asked for.
    epoch: u32,
    read: Option<Outcome>,
}

#[derive(Debug)]
enum Outcome {
    Page(Vec<Delta>, bool),
    NotMember,
    DbError,
}

/// The connection, as the loop keeps it.
#[derive(Debug, Default)]
struct Conn {
    authed: bool,
    subscribed: [bool; ROOMS],
    sync: Option<SyncState>,
    /// A login read by its worker, not yet completed: (room, head).
    login: Option<Vec<(u64, u64)>>,
    /// Per room, the `after` of the fetch the machine waits for: the last it asked for, until
    /// answered or the room is dropped.
    waiting: [Option<u64>; ROOMS],
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
    /// Bumped whenever the room starts over (a SYNC names it, login, leave, logout): fetches
    /// asked for in an earlier epoch are stale.
    epoch: u32,
}

/// A SYNC the client is waiting on.
#[derive(Debug)]
struct OpenSync {
    id: u32,
    /// The rooms whose heads SYNC_DONE must report.
    rooms: Vec<u64>,
    /// Rooms the user left before SYNC_DONE ([`Known::LeftRoom`]).
    left: Vec<u64>,
    /// Rooms that had their final page ([`Known::ResyncFinishedRoom`]).
    finished: Vec<u64>,
}

/// The client: what it has received, checked as it arrives.
#[derive(Debug)]
struct Client {
    views: [View; ROOMS],
    open: Vec<OpenSync>,
    next_id: u32,
    /// The SYNC whose ERROR the next failure should produce.
    expect_error: Option<u32>,
    /// A final page's `resume_after` past its deltas, to be reached by the pushes sent with it
    /// ([`Known::ResumeAfter`]).
    claimed: [Option<u64>; ROOMS],
}

struct Model {
    rooms: Vec<Room>,
    conn: Conn,
    fetches: Vec<Fetch>,
    client: Client,
}

fn delta_of(room: u64, seq: u64, kind: DeltaKind, mine: bool) -> Delta {
    let (author_id, author) = if mine { ME } else { (2, "ann") };
    Delta {
        room,
        seq,
        kind,
        author_id,
        author: author.into(),
        ts_ms: seq as i64 * 1000,
        text: if kind == DeltaKind::MESSAGE { format!("{room}/{seq}") } else { String::new() },
    }
}

impl Model {
    fn new() -> Model {
        // Some history, all of it published; the connection logged in at these heads.
        let rooms = [(3, true), (1, true), (2, false)]
            .into_iter()
            .map(|(n, member)| Room {
                kinds: vec![(DeltaKind::MESSAGE, false); n],
                member,
                unpublished: VecDeque::new(),
                published: n as u64,
            })
            .collect::<Vec<_>>();
        let mut views = [View { cursor: Cursor::Unknown, pages: None, epoch: 0 }; ROOMS];
        let mut conn = Conn { authed: true, ..Conn::default() };
        for (i, r) in rooms.iter().enumerate() {
            if r.member {
                conn.subscribed[i] = true;
                views[i].cursor = Cursor::AtMost(r.head());
            }
        }
        let client = Client { views, open: Vec::new(), next_id: 1, expect_error: None, claimed: [None; ROOMS] };
        Model { rooms, conn, fetches: Vec::new(), client }
    }

    fn room(&self, room: u64) -> &Room {
        &self.rooms[ix(room)]
    }

    fn delta(&self, room: u64, seq: u64) -> Delta {
        let (kind, mine) = self.room(room).kinds[(seq - 1) as usize];
        delta_of(room, seq, kind, mine)
    }

    fn deltas(&self, room: u64, seqs: std::ops::RangeInclusive<u64>) -> Vec<Delta> {
        seqs.map(|s| self.delta(room, s)).collect()
    }

    /// Whether the room's membership is changing or absent, so its deltas are not checked.
    fn exempt(&self, room: u64) -> bool {
        let r = self.room(room);
        !r.member || r.unpublished.iter().any(|e| !matches!(e, Event::Posts { .. }))
    }

    fn commit(&mut self, room: u64, kind: DeltaKind, n: usize) -> Option<u64> {
        let r = &mut self.rooms[ix(room)];
        if r.kinds.len() + n > MAX_SEQ {
            return None;
        }
        let first = r.head() + 1;
        r.kinds.extend(std::iter::repeat_n((kind, kind != DeltaKind::MESSAGE), n));
        Some(first)
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Commit { room, n } => {
                let room = room_of(room);
                let n = 1 + usize::from(n % 3);
                if let Some(first) = self.commit(room, DeltaKind::MESSAGE, n) {
                    let last = first + n as u64 - 1;
                    self.rooms[ix(room)].unpublished.push_back(Event::Posts { first, last });
                }
            }
            Op::Publish { room } => self.publish_next(room_of(room)),
            Op::Join { room } => {
                let room = room_of(room);
                if !self.room(room).member {
                    if let Some(seq) = self.commit(room, DeltaKind::JOIN, 1) {
                        self.rooms[ix(room)].member = true;
                        self.rooms[ix(room)].unpublished.push_back(Event::Joined(seq));
                    }
                }
            }
            Op::Leave { room } => {
                let room = room_of(room);
                if self.room(room).member {
                    if let Some(seq) = self.commit(room, DeltaKind::LEAVE, 1) {
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
        }
    }

    // ---- The loop (server.rs), for this one connection ----

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
                        v.epoch += 1;
                    }
                    self.subscribe_from(room, seq - 1);
                }
                self.publish(room, seq, seq);
            }
            Event::Left(seq) => {
                self.publish(room, seq, seq);
                if self.conn.authed {
                    self.conn.subscribed[ix(room)] = false;
                    if let Some(sync) = self.conn.sync.as_mut() {
                        sync.forget(room);
                    }
                    self.conn.waiting[ix(room)] = None;
                    let v = &mut self.client.views[ix(room)];
                    *v = View { cursor: Cursor::Unknown, pages: None, epoch: v.epoch + 1 };
                    for open in &mut self.client.open {
                        if open.rooms.contains(&room) {
                            open.left.push(room);
                        }
                    }
                }
            }
        }
    }

    /// `publish`: fan-out of one committed batch.
    fn publish(&mut self, room: u64, first: u64, last: u64) {
        let r = &mut self.rooms[ix(room)];
        r.published = r.published.max(last);
        if !self.conn.subscribed[ix(room)] {
            return;
        }
        let p = Published::encode(room, &self.deltas(room, first..=last)).expect("a non-empty batch");
        match self.conn.sync.as_mut() {
            None => self.receive(&p.frames),
            Some(sync) => {
                let actions = sync.push(&p);
                self.apply(actions);
            }
        }
    }

    /// `subscribe_from`.
    fn subscribe_from(&mut self, room: u64, after: u64) {
        self.conn.subscribed[ix(room)] = true;
        if self.room(room).published > after {
            let actions = self.conn.sync.get_or_insert_with(Default::default).catch_up(room, after);
            self.apply(actions);
        }
    }

    /// `apply`: sends go to the client, fetches to the workers.
    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send(bytes) => self.receive(&bytes),
                Action::Fetch { room, after, limit } => {
                    known_room(room);
                    self.conn.waiting[ix(room)] = Some(after);
                    let epoch = self.client.views[ix(room)].epoch;
                    self.fetches.push(Fetch { room, after, limit, epoch, read: None });
                }
            }
        }
        for room in 1..=ROOMS as u64 {
            if let Some(resume_after) = self.client.claimed[ix(room)].take() {
                let cursor = self.client.views[ix(room)].cursor;
                assert_eq!(
                    cursor,
                    Cursor::Exactly(resume_after),
                    "room {room}: resume_after beyond the flushed pushes"
                );
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
                RoomCursor { room, seq: u64::from(seq) % (self.room(room).head() + 3) }
            })
            .collect();
        // KNOWN BUG: naming a room that is done in another open SYNC ends that one early.
        let done_elsewhere = |r: u64| self.client.open.iter().any(|o| o.rooms.contains(&r) && o.finished.contains(&r));
        if cursors.iter().any(|c| done_elsewhere(c.room)) && !strict(Known::ResyncFinishedRoom) {
            return;
        }
        let id = self.client.next_id;
        self.client.next_id += 1;
        let mut rooms = Vec::new();
        for c in &cursors {
            if rooms.contains(&c.room) {
                continue;
            }
            rooms.push(c.room);
            let v = &mut self.client.views[ix(c.room)];
            *v = View { cursor: Cursor::Exactly(c.seq), pages: Some(id), epoch: v.epoch + 1 };
            // The room moves from an earlier, unfinished SYNC to this one.
            for open in &mut self.client.open {
                open.rooms.retain(|&r| r != c.room);
            }
        }
        self.client.open.push(OpenSync { id, rooms, left: Vec::new(), finished: Vec::new() });
        let actions = self.conn.sync.get_or_insert_with(Default::default).start(id, &cursors, page_size);
        self.apply(actions);
    }

    // ---- The workers (worker.rs::fetch) ----

    fn read(&mut self, i: usize, how: ReadHow) {
        let f = &self.fetches[i];
        let outcome = if !self.room(f.room).member {
            Outcome::NotMember
        } else {
            let head = self.room(f.room).head();
            let available = head.saturating_sub(f.after);
            let mut n = available.min(u64::from(f.limit));
            let mut more = available > u64::from(f.limit);
            match how {
                ReadHow::DbError => Outcome::DbError,
                ReadHow::Cut(k) if n > 0 => {
                    n = 1 + u64::from(k) % n;
                    more = true;
                    Outcome::Page(self.deltas(f.room, f.after + 1..=f.after + n), more)
                }
                _ => Outcome::Page(self.deltas(f.room, f.after + 1..=f.after + n), more),
            }
        };
        self.fetches[i].read = Some(outcome);
    }

    /// `complete` for `Completion::Page` / `PageFailed`.
    fn complete(&mut self, i: usize) {
        let f = self.fetches.remove(i);
        let Some(outcome) = f.read else { return };
        let Some(sync) = self.conn.sync.as_mut() else { return };
        // The machine takes this as the answer it waits for (the latest fetch it asked for the
        // room) if the `after` matches; the fetch is current if it was also asked for in the
        // room's current epoch (the current SYNC, catch-up or session).
        let answers = self.conn.waiting[ix(f.room)] == Some(f.after);
        let current = answers && f.epoch == self.client.views[ix(f.room)].epoch;
        let failed = matches!(outcome, Outcome::NotMember | Outcome::DbError);
        // KNOWN BUG: a failure carries no cursor, so one for a fetch the machine no longer waits
        // for still ends the room's SYNC or catch-up.
        if failed && !current && !strict(Known::StaleFailure) {
            return;
        }
        // KNOWN BUG: a page from an earlier epoch with the same `after` is taken as the answer,
        // though it may have been read before deltas the current epoch never held.
        if !failed && answers && !current && !strict(Known::StalePage) {
            return;
        }
        if answers || failed {
            // Answered, or the room dropped (a next page, if any, is asked for by the actions).
            self.conn.waiting[ix(f.room)] = None;
        }
        let stale = !current;
        let actions = match outcome {
            Outcome::Page(deltas, more) => sync.page(f.room, f.after, deltas, more),
            Outcome::NotMember => {
                if !stale {
                    let v = &mut self.client.views[ix(f.room)];
                    // Left out of its SYNC (if any): the client forgets the room.
                    v.cursor = Cursor::Unknown;
                    if v.pages.take().is_some() {
                        for open in &mut self.client.open {
                            open.rooms.retain(|&r| r != f.room);
                        }
                    }
                }
                sync.skip_room(f.room)
            }
            Outcome::DbError => {
                // The worker's `store_error_frame` for the fetch's `to`, whose request id is 0.
                let error = ServerFrame::Error(ErrorBody::new(ErrorCode::INTERNAL, "internal error; retry later"));
                let error = error.encode(0).expect("small");
                if !stale {
                    let v = &mut self.client.views[ix(f.room)];
                    // Deltas may be lost for this room: the client must SYNC it again.
                    v.cursor = Cursor::Unknown;
                    self.client.expect_error = v.pages.take();
                }
                sync.page_failed(f.room, error)
            }
        };
        self.apply(actions);
        assert_eq!(self.client.expect_error.take(), None, "a SYNC's fetch failed but no ERROR was sent");
    }

    fn logout(&mut self) {
        if !self.conn.authed {
            return;
        }
        self.conn = Conn::default();
        for v in &mut self.client.views {
            *v = View { cursor: Cursor::Unknown, pages: None, epoch: v.epoch + 1 };
        }
        self.client.open.clear();
    }

    fn login_done(&mut self) {
        let Some(rooms) = self.conn.login.take() else { return };
        self.conn.authed = true;
        for (room, head) in rooms {
            let v = &mut self.client.views[ix(room)];
            *v = View { cursor: Cursor::AtMost(head), pages: None, epoch: v.epoch + 1 };
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
        let mut rounds = 0;
        while !self.fetches.is_empty() {
            rounds += 1;
            assert!(rounds <= SETTLE_ROUNDS, "the machine keeps fetching: {:?}", self.fetches);
            if self.fetches[0].read.is_none() {
                self.read(0, ReadHow::Whole);
            }
            self.complete(0);
        }
        for open in &self.client.open {
            // KNOWN BUG: a room forgotten (left) before its final page keeps its SYNC pending.
            let known = !open.left.is_empty() && !strict(Known::LeftRoom);
            assert!(known, "SYNC {} was never answered (rooms {:?}, left {:?})", open.id, open.rooms, open.left);
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

    /// Decodes and checks what one action (or one publish) sent.
    fn receive(&mut self, bytes: &Bytes) {
        let decoder = FrameDecoder::default();
        let mut buf = BytesMut::from(&bytes[..]);
        while let Some(raw) = decoder.decode(&mut buf).expect("the connection is sent valid frames") {
            let frame = ServerFrame::decode(&raw).expect("the connection is sent valid bodies");
            self.frame(raw.request_id, frame);
        }
        assert!(buf.is_empty(), "a send ends in a partial frame: {buf:02x?}");
    }

    fn frame(&mut self, id: u32, frame: ServerFrame) {
        match frame {
            ServerFrame::Delta(d) => {
                assert_eq!(id, 0, "a DELTA push carries request id 0");
                known_room(d.room);
                let v = self.client.views[ix(d.room)];
                if !self.exempt(d.room) {
                    assert_eq!(v.pages, None, "a push for room {} while its SYNC {:?} pages", d.room, v.pages);
                }
                self.accept(&d);
            }
            ServerFrame::DeltaPage(p) => {
                known_room(p.room);
                let exempt = self.exempt(p.room);
                let v = self.client.views[ix(p.room)];
                if !exempt {
                    assert_eq!(v.pages, Some(id), "a page of room {} for SYNC {id}", p.room);
                }
                for d in &p.deltas {
                    assert_eq!(d.room, p.room, "a page of room {} holds a delta of room {}", p.room, d.room);
                    self.accept(d);
                }
                let v = &mut self.client.views[ix(p.room)];
                if !exempt && v.cursor != Cursor::Exactly(p.resume_after) {
                    // KNOWN BUG: a final page's resume_after counts the held pushes flushed right
                    // after it; `apply` checks that it does no more than that.
                    let known = !p.more && !strict(Known::ResumeAfter);
                    assert!(
                        known,
                        "room {}: resume_after {} but the page ends at {:?}",
                        p.room, p.resume_after, v.cursor
                    );
                    self.client.claimed[ix(p.room)] = Some(p.resume_after);
                }
                if !p.more {
                    v.pages = None;
                    for open in self.client.open.iter_mut().filter(|o| o.id == id) {
                        open.finished.push(p.room);
                    }
                }
            }
            ServerFrame::SyncDone(done) => {
                let Some(i) = self.client.open.iter().position(|o| o.id == id) else {
                    panic!("SYNC_DONE for {id}, which is not an open SYNC");
                };
                let open = self.client.open.remove(i);
                for h in &done.heads {
                    known_room(h.room);
                    // KNOWN BUG: a room left during the SYNC is still reported, at seq 0.
                    let left = open.left.contains(&h.room) && !strict(Known::LeftRoom);
                    if self.exempt(h.room) || left {
                        continue;
                    }
                    assert!(open.rooms.contains(&h.room), "SYNC_DONE {id} reports room {} it does not cover", h.room);
                    let v = self.client.views[ix(h.room)];
                    assert_eq!(v.pages, None, "SYNC_DONE {id} before room {}'s final page", h.room);
                    assert_eq!(v.cursor, Cursor::Exactly(h.seq), "SYNC_DONE {id}'s head of room {}", h.room);
                }
                for &room in &open.rooms {
                    let reported = done.heads.iter().any(|h| h.room == room);
                    assert!(reported || self.exempt(room), "SYNC_DONE {id} leaves out room {room}");
                }
            }
            ServerFrame::Error(e) => {
                let Some(sync) = self.client.expect_error.take() else {
                    panic!("an unexpected ERROR (request id {id}): {e}");
                };
                // KNOWN BUG: the ERROR ending a SYNC is the worker's, with the fetch's request id
                // 0, so a client cannot tell which request failed.
                assert!(
                    id == sync || (id == 0 && !strict(Known::ErrorId)),
                    "the ERROR ending SYNC {sync} has request id {id}"
                );
                self.client.open.retain(|o| o.id != sync);
                // Its other rooms continue, their deltas arriving as pushes.
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
        assert!(d.seq >= 1 && d.seq <= self.room(d.room).head(), "room {} has no seq {}", d.room, d.seq);
        assert_eq!(*d, self.delta(d.room, d.seq), "a delta that is not the log's");
        let exempt = self.exempt(d.room);
        let v = &mut self.client.views[ix(d.room)];
        if !exempt {
            match v.cursor {
                Cursor::Exactly(c) => assert_eq!(d.seq, c + 1, "room {}: seq {} after {c}", d.room, d.seq),
                Cursor::AtMost(c) => assert!(d.seq <= c + 1, "room {}: seq {} after at most {c}", d.room, d.seq),
                Cursor::Unknown => {}
            }
        }
        v.cursor = Cursor::Exactly(d.seq);
    }
}
