//! SYNC and gap-free delivery for one connection.
//!
//! The guarantee: after a client SYNCs a room from seq N, it receives every later delta of that
//! room exactly once, in seq order, first in `DELTA_PAGE`s, then as live pushes, with no gap and
//! no duplicate, even while other clients post during the sync. Pushes of a room never arrive
//! between its pages: they resume right after its final page, at its `resume_after` + 1.
//!
//! How: per synced room the connection tracks `delivered`, the last seq it has sent. While pages
//! are being fetched (the room is *catching up*), live pushes for it are held back instead of
//! sent. Each page carries the deltas after `delivered`. When the database has nothing more and
//! the held pushes continue the sequence without a gap, they are flushed after the final page
//! (the ones at or below `delivered` were in a page already and are dropped) and the room goes
//! live; otherwise (a gap, or pushes dropped because too much was held) another page is fetched
//! first, still holding. Once live, a push that would skip a seq starts a catch-up of its own, so
//! a gap can never reach the client.
//!
//! This works because a delta's push is queued to the loop only after its commit, and the loop
//! learns of every commit: a delta committed before a page was read is in that page, and one
//! committed after will arrive as a push while the room is held (or after, when the seq check
//! drops or sends it). It needs every page to answer the room's *current* fetch: each fetch has
//! an id, a room waits for exactly one, and a page or failure with another id (an earlier SYNC's
//! fetch of the same room, read before deltas this track never held) is ignored.
//!
//! The state machine is pure: it returns [`Action`]s and leaves sockets and workers to the loop.
//! The `sync` fuzz target (`fuzz/`) drives it as the loop does and checks the guarantee.

use crate::limits::HELD_CAP;
pub use crate::limits::{DEFAULT_PAGE, HELD_BYTES, MAX_PAGE};
use crate::work::{EncodeReply, Published};
use bytes::Bytes;
use chime_protocol::{Delta, DeltaPage, ErrorBody, RoomCursor, RoomId, Seq, ServerFrame, SyncDone};
use std::collections::{HashMap, VecDeque};

/// Identifies one fetch of one connection's sync state.
pub type FetchId = u64;

/// What the loop must do for the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Queue these bytes, made for this connection alone (pages, SYNC_DONE, errors).
    Send(Bytes),
    /// Queue these bytes, a slice of frames published to every subscriber (shared memory).
    Push(Bytes),
    /// Fetch a page of `room` after `after` (a `Job::Fetch` for SYNC); its result must come back
    /// with the same `fetch` id.
    Fetch {
        /// Room.
        room: RoomId,
        /// Seq to fetch after.
        after: Seq,
        /// Page size.
        limit: u32,
        /// The fetch's id.
        fetch: FetchId,
    },
    /// The same, but later (the last attempt failed, say because the database is down): the loop
    /// retries it after a delay. The room stays where it was, holding pushes meanwhile.
    FetchLater {
        /// Room.
        room: RoomId,
        /// Seq to fetch after.
        after: Seq,
        /// Page size.
        limit: u32,
        /// The fetch's id.
        fetch: FetchId,
    },
}

#[derive(Debug)]
enum Mode {
    Live,
    CatchingUp {
        /// The SYNC request this catch-up answers; `None` for a catch-up after a live gap,
        /// a late subscription or a failed SYNC, whose deltas go out as ordinary pushes.
        request: Option<u32>,
        /// The fetch whose result the room waits for.
        waiting: FetchId,
        held: VecDeque<Published>,
        overflowed: bool,
    },
}

#[derive(Debug)]
struct Track {
    delivered: Seq,
    mode: Mode,
    page_size: u32,
}

#[derive(Debug)]
struct Request {
    id: u32,
    /// The request's rooms, reported in SYNC_DONE's heads.
    rooms: Vec<RoomId>,
    /// Of those, the rooms that have not had their final page yet.
    pending: Vec<RoomId>,
}

/// A connection's SYNC state.
#[derive(Debug, Default)]
pub struct SyncState {
    tracks: HashMap<RoomId, Track>,
    requests: Vec<Request>,
    /// Bytes of all held pushes, bounded by [`HELD_BYTES`].
    held_bytes: usize,
    /// The last fetch id handed out.
    last_fetch: FetchId,
    /// Fetches the loop holds back (flow control, the connection's window of shared jobs, the
    /// database away), oldest first.
    pub deferred: VecDeque<Action>,
}

impl SyncState {
    /// Forgets every SYNC, catch-up, held push and deferred fetch (the connection logged out),
    /// but keeps counting fetch ids: fetches of the earlier session still in flight answer this
    /// connection later, and must not be taken for the new session's fetches with the same id.
    pub fn restart(&mut self) {
        *self = SyncState { last_fetch: self.last_fetch, ..SyncState::default() };
    }

    fn next_fetch(&mut self) -> FetchId {
        self.last_fetch += 1;
        self.last_fetch
    }

    /// Starts a SYNC of `cursors` answering request `request_id`. Every room is fetched, member or
    /// not; a fetch for a room the user is not in reports it (see [`SyncState::skip_room`]).
    pub fn start(&mut self, request_id: u32, cursors: &[RoomCursor], page_size: u32) -> Vec<Action> {
        let page_size = if page_size == 0 { DEFAULT_PAGE } else { page_size.min(MAX_PAGE) };
        let mut rooms: Vec<RoomId> = Vec::with_capacity(cursors.len());
        let mut actions = Vec::new();
        for c in cursors {
            if rooms.contains(&c.room) {
                continue;
            }
            rooms.push(c.room);
            // A room of an earlier, unfinished request moves to this one: the earlier one no
            // longer waits for it (whether or not it had its final page) nor reports it.
            for r in &mut self.requests {
                r.rooms.retain(|&x| x != c.room);
                r.pending.retain(|&x| x != c.room);
            }
            let held = match self.tracks.remove(&c.room) {
                Some(Track { mode: Mode::CatchingUp { held, .. }, .. }) => held,
                _ => VecDeque::new(),
            };
            // Pushes held for the old cursor stay held: the new fetch starts from another cursor,
            // and `page` drops the ones it covers.
            let fetch = self.next_fetch();
            let mode = Mode::CatchingUp { request: Some(request_id), waiting: fetch, held, overflowed: false };
            self.tracks.insert(c.room, Track { delivered: c.seq, mode, page_size });
            actions.push(Action::Fetch { room: c.room, after: c.seq, limit: page_size, fetch });
        }
        let pending = rooms.clone();
        self.requests.push(Request { id: request_id, rooms, pending });
        // Requests emptied by this one are complete.
        actions.extend(self.finish_requests());
        actions
    }

    /// A live push for `room`. Returns what to send (possibly nothing) and maybe a fetch.
    pub fn push(&mut self, p: &Published) -> Vec<Action> {
        let Some(track) = self.tracks.get_mut(&p.room) else {
            return vec![Action::Push(p.frames.clone())];
        };
        match &mut track.mode {
            Mode::CatchingUp { held, overflowed, .. } => {
                if held.len() >= HELD_CAP || self.held_bytes + p.frames.len() > HELD_BYTES {
                    *overflowed = true;
                } else {
                    self.held_bytes += p.frames.len();
                    held.push_back(p.clone());
                }
                Vec::new()
            }
            Mode::Live => {
                if p.last_seq() <= track.delivered {
                    Vec::new()
                } else if p.first_seq <= track.delivered.next() {
                    let frames = p.frames_after(track.delivered);
                    track.delivered = p.last_seq();
                    vec![Action::Push(frames)]
                } else {
                    let after = track.delivered;
                    let mut held = VecDeque::new();
                    let overflowed = self.held_bytes + p.frames.len() > HELD_BYTES;
                    if !overflowed {
                        self.held_bytes += p.frames.len();
                        held.push_back(p.clone());
                    }
                    self.last_fetch += 1;
                    let fetch = self.last_fetch;
                    track.mode = Mode::CatchingUp { request: None, waiting: fetch, held, overflowed };
                    vec![Action::Fetch { room: p.room, after, limit: track.page_size, fetch }]
                }
            }
        }
    }

    /// The page that fetch `fetch` of `room` read: `deltas` after the fetch's cursor, and whether
    /// more follow. A page for any other fetch than the one the room waits for is ignored.
    pub fn page(&mut self, room: RoomId, fetch: FetchId, deltas: Vec<Delta>, more: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        let next_fetch = self.last_fetch + 1;
        let Some(track) = self.tracks.get_mut(&room) else {
            return actions;
        };
        let Mode::CatchingUp { request, waiting, held, overflowed } = &mut track.mode else {
            return actions;
        };
        if *waiting != fetch {
            // An earlier fetch of this room (a SYNC or catch-up that was replaced): it may have
            // been read before deltas this track never held.
            return actions;
        }
        let fresh: Vec<Delta> = deltas.into_iter().filter(|d| d.seq > track.delivered).collect();
        if let Some(last) = fresh.last() {
            track.delivered = last.seq;
        }
        let page_end = track.delivered;
        // The held pushes that were in this page are not needed any more.
        while held.front().is_some_and(|p| p.last_seq() <= page_end) {
            if let Some(p) = held.pop_front() {
                self.held_bytes -= p.frames.len();
            }
        }
        // Caught up when the database had nothing more and what was held while reading continues
        // the page without a gap (and nothing was dropped while holding).
        let mut caught_up = !more && !*overflowed;
        if caught_up {
            let mut end = page_end;
            for p in held.iter() {
                if p.first_seq > end.next() {
                    caught_up = false;
                    break;
                }
                end = end.max(p.last_seq());
            }
        }
        let request = *request;
        match request {
            Some(id) => {
                let page = DeltaPage { room, deltas: fresh, more: !caught_up, resume_after: page_end };
                actions.push(Action::Send(ServerFrame::DeltaPage(page).reply(id)));
            }
            None => {
                let mut buf = Vec::new();
                for d in fresh {
                    if let Err(e) = ServerFrame::Delta(d).encode_into(&mut buf, 0) {
                        log::error!("not sending room {room}'s catch-up: {e}");
                        break;
                    }
                }
                if !buf.is_empty() {
                    actions.push(Action::Send(Bytes::from(buf)));
                }
            }
        }
        if !caught_up {
            // Still holding; the next page starts where this one ended. It is read after every
            // push dropped so far was committed, so it covers them: forget the overflow.
            *overflowed = false;
            *waiting = next_fetch;
            self.last_fetch = next_fetch;
            actions.push(Action::Fetch { room, after: page_end, limit: track.page_size, fetch: next_fetch });
            return actions;
        }
        // Live from here: what was held follows the final page.
        for p in held.drain(..) {
            self.held_bytes -= p.frames.len();
            let frames = p.frames_after(track.delivered);
            track.delivered = track.delivered.max(p.last_seq());
            if !frames.is_empty() {
                actions.push(Action::Push(frames));
            }
        }
        track.mode = Mode::Live;
        if let Some(id) = request {
            if let Some(r) = self.requests.iter_mut().find(|r| r.id == id) {
                r.pending.retain(|&x| x != room);
            }
            actions.extend(self.finish_requests());
        }
        actions
    }

    /// Fetch `fetch` of `room` failed with `error` (the database is unavailable, say). A SYNC the
    /// room belonged to ends with that error (with the SYNC's request id); the room itself, and
    /// the request's other rooms, keep catching up, their deltas sent as pushes, so that no gap
    /// ever reaches the client. The failed fetch is retried later ([`Action::FetchLater`]), still
    /// holding pushes. A failure of a fetch the room no longer waits for is ignored.
    pub fn page_failed(&mut self, room: RoomId, fetch: FetchId, error: ErrorBody) -> Vec<Action> {
        let Some(track) = self.tracks.get_mut(&room) else {
            return Vec::new();
        };
        let Mode::CatchingUp { request, waiting, .. } = &mut track.mode else {
            return Vec::new();
        };
        if *waiting != fetch {
            return Vec::new();
        }
        let retry = Action::FetchLater { room, after: track.delivered, limit: track.page_size, fetch };
        let request = request.take();
        let mut actions = self.end_request(request, error);
        actions.push(retry);
        actions
    }

    /// Fetch `fetch` found the SYNC's cursor for `room` past the room's head (a corrupt cursor,
    /// or a server restored from an older backup). The SYNC ends with `error` (CURSOR_AHEAD, with
    /// its request id) and the room is dropped from it; the request's other rooms keep catching
    /// up as pushes, and the room's live pushes go out as they come. A report for a fetch the
    /// room no longer waits for is ignored.
    pub fn reject_room(&mut self, room: RoomId, fetch: FetchId, error: ErrorBody) -> Vec<Action> {
        if !self.wants(room, fetch) {
            return Vec::new();
        }
        let request = match self.tracks.get_mut(&room) {
            Some(Track { mode: Mode::CatchingUp { request, .. }, .. }) => request.take(),
            _ => None,
        };
        let mut actions = self.end_request(request, error);
        actions.extend(self.forget(room));
        actions
    }

    /// Ends SYNC `id` (if still open) with `error`: its rooms go on catching up without it.
    fn end_request(&mut self, id: Option<u32>, error: ErrorBody) -> Vec<Action> {
        let Some(id) = id else { return Vec::new() };
        let Some(i) = self.requests.iter().position(|r| r.id == id) else {
            return Vec::new();
        };
        let req = self.requests.remove(i);
        for other in req.rooms {
            if let Some(Track { mode: Mode::CatchingUp { request, .. }, .. }) = self.tracks.get_mut(&other) {
                if *request == Some(id) {
                    *request = None;
                }
            }
        }
        vec![Action::Send(ServerFrame::Error(error).reply(id))]
    }

    /// The connection was subscribed to `room` knowing its log only up to `after`, and the room
    /// has moved on since: fetch the rest, holding live pushes meanwhile, then go live. Nothing
    /// to do if the room is tracked already.
    pub fn catch_up(&mut self, room: RoomId, after: Seq) -> Vec<Action> {
        if self.tracks.contains_key(&room) {
            return Vec::new();
        }
        let fetch = self.next_fetch();
        let mode = Mode::CatchingUp { request: None, waiting: fetch, held: VecDeque::new(), overflowed: false };
        self.tracks.insert(room, Track { delivered: after, mode, page_size: DEFAULT_PAGE });
        vec![Action::Fetch { room, after, limit: DEFAULT_PAGE, fetch }]
    }

    /// Fetch `fetch` found the user is not a member of `room`: it gets no pages and is left out
    /// of its SYNC's `heads`. A report for a fetch the room no longer waits for is ignored.
    pub fn skip_room(&mut self, room: RoomId, fetch: FetchId) -> Vec<Action> {
        if !self.wants(room, fetch) {
            return Vec::new();
        }
        self.forget(room)
    }

    /// The connection no longer receives `room` (the user left it): forget it, and leave it out
    /// of any SYNC still open (which may then be complete).
    pub fn forget(&mut self, room: RoomId) -> Vec<Action> {
        self.remove_track(room);
        let mut touched = false;
        for r in &mut self.requests {
            let before = r.rooms.len();
            r.rooms.retain(|&x| x != room);
            r.pending.retain(|&x| x != room);
            touched |= r.rooms.len() != before;
        }
        if touched {
            self.finish_requests()
        } else {
            Vec::new()
        }
    }

    /// Whether `room` still waits for fetch `fetch` (a deferred fetch that a newer one replaced
    /// need not run).
    pub fn wants(&self, room: RoomId, fetch: FetchId) -> bool {
        matches!(
            self.tracks.get(&room),
            Some(Track { mode: Mode::CatchingUp { waiting, .. }, .. }) if *waiting == fetch
        )
    }

    /// Bytes of pushes held while catching up.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Removes a room's track, releasing what it held.
    fn remove_track(&mut self, room: RoomId) -> Option<Track> {
        let track = self.tracks.remove(&room)?;
        if let Mode::CatchingUp { held, .. } = &track.mode {
            self.held_bytes -= held.iter().map(|p| p.frames.len()).sum::<usize>();
        }
        Some(track)
    }

    /// Sends SYNC_DONE for every request whose rooms have all had their final page.
    fn finish_requests(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let tracks = &self.tracks;
        self.requests.retain(|r| {
            if !r.pending.is_empty() {
                return true;
            }
            let heads = r
                .rooms
                .iter()
                .map(|&room| RoomCursor { room, seq: tracks.get(&room).map_or(Seq::ZERO, |t| t.delivered) })
                .collect();
            actions.push(Action::Send(ServerFrame::SyncDone(SyncDone { heads }).reply(r.id)));
            false
        });
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use chime_protocol::{DeltaBody, ErrorCode, FrameDecoder, UserId};

    fn delta(room: u64, seq: u64) -> Delta {
        Delta {
            room: RoomId(room),
            seq: Seq(seq),
            author_id: UserId(1),
            author: "a".into(),
            ts_ms: 0,
            body: DeltaBody::message(format!("{seq}")),
        }
    }

    fn published(room: u64, seqs: std::ops::RangeInclusive<u64>) -> Published {
        let deltas: Vec<Delta> = seqs.map(|s| delta(room, s)).collect();
        Published::encode(RoomId(room), &deltas).expect("non-empty range")
    }

    /// Every frame sent, decoded, in order.
    fn frames(actions: &[Action]) -> Vec<(u32, ServerFrame)> {
        let mut out = Vec::new();
        let dec = FrameDecoder::default();
        for a in actions {
            if let Action::Send(b) | Action::Push(b) = a {
                let mut buf = BytesMut::from(&b[..]);
                while let Some(raw) = dec.decode(&mut buf).expect("valid") {
                    out.push((raw.request_id, ServerFrame::decode(&raw).expect("valid")));
                }
            }
        }
        out
    }

    /// The seqs sent (pages and pushes flattened, in order) and how many SYNC_DONEs.
    fn sent_seqs(actions: &[Action]) -> (Vec<u64>, usize) {
        let mut seqs = Vec::new();
        let mut dones = 0;
        for (_, f) in frames(actions) {
            match f {
                ServerFrame::Delta(d) => seqs.push(d.seq.get()),
                ServerFrame::DeltaPage(p) => seqs.extend(p.deltas.iter().map(|d| d.seq.get())),
                ServerFrame::SyncDone(_) => dones += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        (seqs, dones)
    }

    /// The last fetch asked for: (room, after, limit, id).
    fn fetch(actions: &[Action]) -> (u64, u64, u32, FetchId) {
        match actions.iter().rev().find(|a| matches!(a, Action::Fetch { .. })) {
            Some(&Action::Fetch { room, after, limit, fetch }) => (room.get(), after.get(), limit, fetch),
            _ => panic!("no fetch in {actions:?}"),
        }
    }

    fn unavailable() -> ErrorBody {
        ErrorBody::new(ErrorCode::UNAVAILABLE, "down")
    }

    #[test]
    fn a_fetch_of_an_earlier_session_is_not_taken_for_a_new_one() {
        let mut s = SyncState::default();
        let (_, _, _, old) = fetch(&s.start(1, &[RoomCursor { room: RoomId(2), seq: Seq(1) }], 2));
        s.restart();
        let a = s.start(2, &[RoomCursor { room: RoomId(2), seq: Seq(0) }], 2);
        let (_, after, _, new) = fetch(&a);
        assert_eq!(after, 0);
        assert_ne!(old, new, "fetch ids keep counting across a logout");
        // The earlier session's empty page and failure arrive first: both are ignored.
        assert!(s.page(RoomId(2), old, vec![], false).is_empty());
        assert!(s.page_failed(RoomId(2), old, unavailable()).is_empty());
        assert!(!s.wants(RoomId(2), old));
        let a = s.page(RoomId(2), new, vec![delta(2, 1)], false);
        assert_eq!(sent_seqs(&a), (vec![1], 1));
    }

    #[test]
    fn a_cursor_past_the_head_ends_the_sync_with_an_error_and_drops_the_room() {
        let mut s = SyncState::default();
        let a =
            s.start(5, &[RoomCursor { room: RoomId(1), seq: Seq(9) }, RoomCursor { room: RoomId(2), seq: Seq(0) }], 10);
        let fetches: Vec<_> = a
            .iter()
            .filter_map(|a| match a {
                Action::Fetch { room, fetch, .. } => Some((*room, *fetch)),
                _ => None,
            })
            .collect();
        let (f1, f2) = (fetches[0].1, fetches[1].1);
        assert_eq!((fetches[0].0, fetches[1].0), (RoomId(1), RoomId(2)));
        let ahead = ErrorBody::new(ErrorCode::CURSOR_AHEAD, "past the head");
        let a = s.reject_room(RoomId(1), f1, ahead.clone());
        let sent = frames(&a);
        assert!(matches!(&sent[..], [(5, ServerFrame::Error(e))] if e.code == ErrorCode::CURSOR_AHEAD), "{sent:?}");
        // The room is live now; room 2 goes on catching up, its page sent as pushes.
        assert_eq!(sent_seqs(&s.push(&published(1, 3..=3))), (vec![3], 0));
        assert!(s.reject_room(RoomId(1), f1, ahead).is_empty(), "a second report is stale");
        let a = s.page(RoomId(2), f2, vec![delta(2, 1)], false);
        let sent = frames(&a);
        assert!(matches!(&sent[..], [(0, ServerFrame::Delta(d))] if d.seq == Seq(1)), "{sent:?}");
    }

    #[test]
    fn pushes_during_sync_are_held_then_deduplicated() {
        let mut s = SyncState::default();
        let a = s.start(9, &[RoomCursor { room: RoomId(1), seq: Seq(0) }], 2);
        let (_, after, limit, f1) = fetch(&a);
        assert_eq!((after, limit), (0, 2));
        // Seq 3 commits while page 1 is read; its push arrives before the page.
        assert!(s.push(&published(1, 3..=3)).is_empty());
        let a = s.page(RoomId(1), f1, vec![delta(1, 1), delta(1, 2)], true);
        assert_eq!(sent_seqs(&a), (vec![1, 2], 0));
        let (_, after, _, f2) = fetch(&a);
        assert_eq!(after, 2);
        // Seq 4 commits after page 2 was read.
        assert!(s.push(&published(1, 4..=4)).is_empty());
        let a = s.page(RoomId(1), f2, vec![delta(1, 3)], false);
        assert_eq!(sent_seqs(&a), (vec![3, 4], 1));
        // Live now: a duplicate is dropped, the next one goes out.
        assert!(s.push(&published(1, 4..=4)).is_empty());
        assert_eq!(sent_seqs(&s.push(&published(1, 5..=6))), (vec![5, 6], 0));
    }

    #[test]
    fn the_final_page_resumes_where_it_ends_and_pushes_follow_it() {
        let mut s = SyncState::default();
        let (_, _, _, f) = fetch(&s.start(3, &[RoomCursor { room: RoomId(1), seq: Seq(0) }], 10));
        assert!(s.push(&published(1, 3..=4)).is_empty());
        let a = s.page(RoomId(1), f, vec![delta(1, 1), delta(1, 2)], false);
        let sent = frames(&a);
        // The page covers 1..2 and says so; the held 3..4 follow it as pushes; then SYNC_DONE.
        let ServerFrame::DeltaPage(page) = &sent[0].1 else { panic!("{sent:?}") };
        assert_eq!((page.resume_after, page.more), (Seq(2), false));
        assert!(matches!(&sent[1].1, ServerFrame::Delta(d) if d.seq == Seq(3)));
        assert!(matches!(&sent[2].1, ServerFrame::Delta(d) if d.seq == Seq(4)));
        let ServerFrame::SyncDone(done) = &sent[3].1 else { panic!("{sent:?}") };
        assert_eq!(done.heads, vec![RoomCursor { room: RoomId(1), seq: Seq(4) }]);
    }

    #[test]
    fn no_push_between_pages_when_held_ones_leave_a_gap() {
        let mut s = SyncState::default();
        let (_, _, _, f) = fetch(&s.start(1, &[RoomCursor { room: RoomId(1), seq: Seq(0) }], 10));
        s.push(&published(1, 5..=5));
        let a = s.page(RoomId(1), f, vec![delta(1, 1), delta(1, 2)], false);
        // Held 5 does not continue 2: another page first, and nothing pushed before it.
        assert_eq!(sent_seqs(&a), (vec![1, 2], 0));
        let ServerFrame::DeltaPage(page) = &frames(&a)[0].1 else { panic!() };
        assert!(page.more);
        let (_, after, _, f2) = fetch(&a);
        assert_eq!(after, 2);
        let a = s.page(RoomId(1), f2, vec![delta(1, 3), delta(1, 4), delta(1, 5)], false);
        assert_eq!(sent_seqs(&a), (vec![3, 4, 5], 1));
    }

    #[test]
    fn a_live_gap_starts_a_catch_up() {
        let mut s = SyncState::default();
        let (_, _, _, f) = fetch(&s.start(1, &[RoomCursor { room: RoomId(1), seq: Seq(0) }], 10));
        s.page(RoomId(1), f, vec![], false);
        let a = s.push(&published(1, 3..=3));
        let (room, after, limit, f) = fetch(&a);
        assert_eq!((room, after, limit), (1, 0, 10));
        let a = s.page(RoomId(1), f, vec![delta(1, 1), delta(1, 2), delta(1, 3)], false);
        assert_eq!(sent_seqs(&a), (vec![1, 2, 3], 0));
    }

    #[test]
    fn non_member_rooms_are_left_out() {
        let mut s = SyncState::default();
        let a =
            s.start(4, &[RoomCursor { room: RoomId(1), seq: Seq(0) }, RoomCursor { room: RoomId(2), seq: Seq(0) }], 10);
        let Action::Fetch { fetch: f1, .. } = a[0] else { panic!() };
        let Action::Fetch { fetch: f2, .. } = a[1] else { panic!() };
        assert!(s.skip_room(RoomId(2), f2).is_empty());
        let a = s.page(RoomId(1), f1, vec![delta(1, 1)], false);
        assert_eq!(sent_seqs(&a), (vec![1], 1));
        let Some((4, ServerFrame::SyncDone(d))) = frames(&a).pop() else { panic!("no SYNC_DONE") };
        assert_eq!(d.heads, vec![RoomCursor { room: RoomId(1), seq: Seq(1) }]);
    }

    #[test]
    fn a_late_subscription_catches_up_then_goes_live() {
        let mut s = SyncState::default();
        // Subscribed knowing seq 3; the loop had already published up to 5.
        let a = s.catch_up(RoomId(1), Seq(3));
        let (_, after, limit, f) = fetch(&a);
        assert_eq!((after, limit), (3, DEFAULT_PAGE));
        assert!(s.push(&published(1, 6..=6)).is_empty());
        let a = s.page(RoomId(1), f, vec![delta(1, 4), delta(1, 5)], false);
        assert_eq!(sent_seqs(&a), (vec![4, 5, 6], 0));
        assert_eq!(sent_seqs(&s.push(&published(1, 7..=7))), (vec![7], 0));
        assert!(s.catch_up(RoomId(1), Seq(0)).is_empty(), "already tracked");
    }

    #[test]
    fn untracked_rooms_pass_through() {
        let mut s = SyncState::default();
        assert_eq!(sent_seqs(&s.push(&published(2, 7..=8))), (vec![7, 8], 0));
    }

    #[test]
    fn pages_and_failures_of_replaced_fetches_are_ignored() {
        let mut s = SyncState::default();
        let a =
            s.start(1, &[RoomCursor { room: RoomId(1), seq: Seq(0) }, RoomCursor { room: RoomId(2), seq: Seq(0) }], 10);
        let Action::Fetch { fetch: old, .. } = a[0] else { panic!() };
        let Action::Fetch { fetch: two, .. } = a[1] else { panic!() };
        // A second SYNC of room 1 from the same cursor replaces the first one's fetch.
        let (_, _, _, new) = fetch(&s.start(2, &[RoomCursor { room: RoomId(1), seq: Seq(0) }], 10));
        assert!(s.page(RoomId(1), old, vec![delta(1, 1)], false).is_empty(), "an old page, even with the same cursor");
        assert!(s.page_failed(RoomId(1), old, unavailable()).is_empty(), "an old failure");
        assert!(s.skip_room(RoomId(1), old).is_empty(), "an old refusal");
        // Room 2's failure ends request 1 with its own request id, and room 2 keeps catching up.
        let a = s.page_failed(RoomId(2), two, unavailable());
        let sent = frames(&a);
        assert!(matches!(&sent[..], [(1, ServerFrame::Error(e))] if e.code == ErrorCode::UNAVAILABLE), "{sent:?}");
        assert_eq!(a.last(), Some(&Action::FetchLater { room: RoomId(2), after: Seq(0), limit: 10, fetch: two }));
        let a = s.page(RoomId(1), new, vec![delta(1, 1)], false);
        assert_eq!(sent_seqs(&a), (vec![1], 1));
        // Room 2's retried fetch: its deltas arrive as pushes, gap-free.
        assert!(s.push(&published(2, 3..=3)).is_empty());
        let a = s.page(RoomId(2), two, vec![delta(2, 1), delta(2, 2)], false);
        assert_eq!(sent_seqs(&a), (vec![1, 2, 3], 0));
    }

    #[test]
    fn a_failed_catch_up_is_retried_not_dropped() {
        let mut s = SyncState::default();
        let (_, _, _, f) = fetch(&s.catch_up(RoomId(4), Seq(2)));
        assert_eq!(
            s.page_failed(RoomId(4), f, unavailable()),
            vec![Action::FetchLater { room: RoomId(4), after: Seq(2), limit: DEFAULT_PAGE, fetch: f }]
        );
        assert!(s.wants(RoomId(4), f));
        // Still held, still gap-checked: a push is not sent raw.
        assert!(s.push(&published(4, 5..=5)).is_empty());
        let a = s.page(RoomId(4), f, vec![delta(4, 3), delta(4, 4)], false);
        assert_eq!(sent_seqs(&a), (vec![3, 4, 5], 0));
        assert!(!s.wants(RoomId(4), f));
    }

    #[test]
    fn a_room_left_during_a_sync_is_dropped_from_it() {
        let mut s = SyncState::default();
        let a =
            s.start(7, &[RoomCursor { room: RoomId(1), seq: Seq(0) }, RoomCursor { room: RoomId(2), seq: Seq(0) }], 10);
        let Action::Fetch { fetch: f1, .. } = a[0] else { panic!() };
        assert!(s.page(RoomId(1), f1, vec![delta(1, 1)], false).iter().all(|a| !matches!(a, Action::Fetch { .. })));
        // Room 2 is left before its final page: the SYNC completes without it.
        let a = s.forget(RoomId(2));
        let Some((7, ServerFrame::SyncDone(d))) = frames(&a).pop() else { panic!("no SYNC_DONE: {a:?}") };
        assert_eq!(d.heads, vec![RoomCursor { room: RoomId(1), seq: Seq(1) }]);
    }

    #[test]
    fn a_new_sync_of_a_finished_room_does_not_end_the_earlier_one() {
        let mut s = SyncState::default();
        let a =
            s.start(1, &[RoomCursor { room: RoomId(1), seq: Seq(0) }, RoomCursor { room: RoomId(2), seq: Seq(0) }], 10);
        let Action::Fetch { fetch: f1, .. } = a[0] else { panic!() };
        let Action::Fetch { fetch: f2, .. } = a[1] else { panic!() };
        assert_eq!(sent_seqs(&s.page(RoomId(1), f1, vec![delta(1, 1)], false)), (vec![1], 0));
        // Room 1 (already final in request 1) is synced again: request 1 still waits for room 2.
        let a = s.start(2, &[RoomCursor { room: RoomId(1), seq: Seq(1) }], 10);
        assert!(frames(&a).is_empty(), "request 1 must not end yet: {a:?}");
        let (_, _, _, f3) = fetch(&a);
        let done = frames(&s.page(RoomId(2), f2, vec![delta(2, 1)], false));
        assert!(
            matches!(done.last(), Some((1, ServerFrame::SyncDone(d))) if d.heads == vec![RoomCursor { room: RoomId(2), seq: Seq(1) }])
        );
        let done = frames(&s.page(RoomId(1), f3, vec![], false));
        assert!(
            matches!(done.last(), Some((2, ServerFrame::SyncDone(d))) if d.heads == vec![RoomCursor { room: RoomId(1), seq: Seq(1) }])
        );
    }

    #[test]
    fn held_pushes_are_bounded_in_bytes() {
        let mut s = SyncState::default();
        let (_, _, _, f) = fetch(&s.start(1, &[RoomCursor { room: RoomId(1), seq: Seq(0) }], 10));
        let big = |seq: u64| {
            let mut d = delta(1, seq);
            d.body = DeltaBody::message("x".repeat(60_000));
            Published::encode(RoomId(1), &[d]).expect("one delta")
        };
        let mut seq = 1;
        while s.held_bytes() + 61_000 <= HELD_BYTES {
            assert!(s.push(&big(seq)).is_empty());
            seq += 1;
        }
        let held = s.held_bytes();
        assert!(held > HELD_BYTES / 2);
        // Over the bound: dropped (the database has it), and the page that follows fetches again.
        assert!(s.push(&big(seq)).is_empty());
        assert_eq!(s.held_bytes(), held);
        let a = s.page(RoomId(1), f, vec![], false);
        assert!(matches!(a.last(), Some(Action::Fetch { room: RoomId(1), .. })), "{a:?}");
        // The next page covers what was dropped: the room goes live and the SYNC ends.
        let (_, after, _, f2) = fetch(&a);
        assert_eq!(after, 0, "nothing is pushed between pages");
        let a = s.page(RoomId(1), f2, (1..=seq).map(|n| delta(1, n)).collect(), false);
        assert_eq!(sent_seqs(&a), ((1..=seq).collect(), 1));
        assert_eq!(s.held_bytes(), 0);
        assert_eq!(sent_seqs(&s.push(&published(1, seq + 1..=seq + 1))), (vec![seq + 1], 0));
        s.forget(RoomId(1));
        assert_eq!(s.held_bytes(), 0);
    }
}
