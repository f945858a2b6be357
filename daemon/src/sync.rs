//! SYNC and gap-free delivery for one connection.
//!
//! The guarantee: after a client SYNCs a room from seq N, it receives every later delta of that
//! room exactly once, in seq order, first in `DELTA_PAGE`s, then as live pushes, with no gap and
//! no duplicate, even while other clients post during the sync.
//!
//! How: per synced room the connection tracks `delivered`, the last seq it has sent. While pages
//! are being fetched (the room is *catching up*), live pushes for it are held back instead of
//! sent. Each page carries the deltas after `delivered`. When the database has nothing more, the
//! held pushes are flushed: the ones at or below `delivered` were in a page already and are
//! dropped, the rest continue the sequence. If a held push does not continue it (the holding
//! buffer overflowed, say), another page is fetched first. Once live, a push that would skip a seq
//! starts a catch-up of its own, so a gap can never reach the client.
//!
//! This works because a delta's push is queued to the loop only after its commit, and the loop
//! learns of every commit: a delta committed before a page was read is in that page, and one
//! committed after will arrive as a push while the room is held (or after, when the seq check
//! drops or sends it).
//!
//! The state machine is pure: it returns [`Action`]s and leaves sockets and workers to the loop.

use crate::worker::{EncodeReply, Published};
use bytes::Bytes;
use chime_protocol::{Delta, DeltaPage, RoomCursor, ServerFrame, SyncDone};
use std::collections::{HashMap, VecDeque};

/// Pushes held per catching-up room before further ones are dropped (and fetched again later).
const HELD_CAP: usize = 4096;

/// Bytes of pushes one connection holds across all its catching-up rooms before further ones are
/// dropped (and fetched again later). Held pushes are shared with other recipients, but a
/// connection holding them keeps them alive: without a bound, a slow SYNC in a busy room would pin
/// everything published meanwhile.
pub const HELD_BYTES: usize = 1 << 20;

/// Largest SYNC page; a client asking for more gets this many.
pub const MAX_PAGE: u32 = 1000;

/// The page size used when a client asks for 0.
pub const DEFAULT_PAGE: u32 = 500;

/// What the loop must do for the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Queue these bytes, made for this connection alone (pages, SYNC_DONE, errors).
    Send(Bytes),
    /// Queue these bytes, a slice of frames published to every subscriber (shared memory).
    Push(Bytes),
    /// Fetch later (the last fetch failed, say because the database is down): the loop retries
    /// it after a delay. The room stays caught up to where it was, holding pushes meanwhile.
    FetchLater {
        /// Room.
        room: u64,
        /// Seq to fetch after.
        after: u64,
        /// Page size.
        limit: u32,
    },
    /// Fetch a page of `room` after `after` (a `Job::Fetch` with `FetchPurpose::Sync`).
    Fetch {
        /// Room.
        room: u64,
        /// Seq to fetch after.
        after: u64,
        /// Page size.
        limit: u32,
    },
}

#[derive(Debug)]
enum Mode {
    Live,
    CatchingUp {
        /// The SYNC request this catch-up answers; `None` for a catch-up after a live gap,
        /// whose deltas go out as ordinary pushes.
        request: Option<u32>,
        held: VecDeque<Published>,
        overflowed: bool,
    },
}

#[derive(Debug)]
struct Track {
    delivered: u64,
    mode: Mode,
    page_size: u32,
}

#[derive(Debug)]
struct Request {
    id: u32,
    rooms: Vec<u64>,
    pending: usize,
}

/// A connection's SYNC state.
#[derive(Debug, Default)]
pub struct SyncState {
    tracks: HashMap<u64, Track>,
    requests: Vec<Request>,
    /// Bytes of all held pushes, bounded by [`HELD_BYTES`].
    held_bytes: usize,
    /// Fetches held back by flow control until the client drains its queue (set by the loop).
    pub deferred: Vec<Action>,
}

impl SyncState {
    /// Starts a SYNC. `subscribed` says whether the connection receives the room's pushes (it is
    /// a member); rooms it does not are still fetched, and the fetch reports NOT_MEMBER.
    pub fn start(&mut self, request_id: u32, cursors: &[RoomCursor], page_size: u32) -> Vec<Action> {
        let page_size = if page_size == 0 { DEFAULT_PAGE } else { page_size.min(MAX_PAGE) };
        let mut rooms: Vec<u64> = Vec::with_capacity(cursors.len());
        let mut actions = Vec::new();
        for c in cursors {
            if rooms.contains(&c.room) {
                continue;
            }
            rooms.push(c.room);
            // A room already tracked by an earlier, unfinished request moves to this one.
            for r in &mut self.requests {
                if let Some(i) = r.rooms.iter().position(|&x| x == c.room) {
                    r.rooms.remove(i);
                    r.pending = r.pending.saturating_sub(1);
                }
            }
            let held = match self.tracks.remove(&c.room) {
                Some(Track { mode: Mode::CatchingUp { held, .. }, .. }) => held,
                _ => VecDeque::new(),
            };
            // Pushes held for the old cursor stay held: the new fetch starts from another cursor,
            // and `page` drops the ones it covers.
            self.tracks.insert(
                c.room,
                Track {
                    delivered: c.seq,
                    mode: Mode::CatchingUp { request: Some(request_id), held, overflowed: false },
                    page_size,
                },
            );
            actions.push(Action::Fetch { room: c.room, after: c.seq, limit: page_size });
        }
        let pending = rooms.len();
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
                } else if p.first_seq <= track.delivered + 1 {
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
                    track.mode = Mode::CatchingUp { request: None, held, overflowed };
                    vec![Action::Fetch { room: p.room, after, limit: track.page_size }]
                }
            }
        }
    }

    /// A fetched page arrived.
    pub fn page(&mut self, room: u64, after: u64, deltas: Vec<Delta>, more: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(track) = self.tracks.get_mut(&room) else {
            return actions;
        };
        let Mode::CatchingUp { request, held, overflowed } = &mut track.mode else {
            return actions;
        };
        if after != track.delivered {
            // A page for a cursor this room has moved past (a newer SYNC replaced the old one).
            return actions;
        }
        let fresh: Vec<Delta> = deltas.into_iter().filter(|d| d.seq > track.delivered).collect();
        if let Some(last) = fresh.last() {
            track.delivered = last.seq;
        }
        // Pages that found nothing more: flush what was held while fetching, if it continues the
        // sequence; otherwise keep fetching.
        let mut flushed: Vec<Bytes> = Vec::new();
        let mut caught_up = false;
        if !more {
            caught_up = true;
            while let Some(p) = held.front() {
                if p.last_seq() <= track.delivered {
                    self.held_bytes -= p.frames.len();
                    held.pop_front();
                } else if p.first_seq <= track.delivered + 1 {
                    flushed.push(p.frames_after(track.delivered));
                    track.delivered = p.last_seq();
                    self.held_bytes -= p.frames.len();
                    held.pop_front();
                } else {
                    caught_up = false;
                    break;
                }
            }
            if *overflowed {
                // Pushes were dropped while holding: the database has them.
                *overflowed = false;
                caught_up = false;
            }
        }
        let request = *request;
        match request {
            Some(id) => {
                let page = DeltaPage { room, deltas: fresh, more: !caught_up, resume_after: track.delivered };
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
        actions.extend(flushed.into_iter().filter(|b| !b.is_empty()).map(Action::Push));
        if caught_up {
            track.mode = Mode::Live;
            if let Some(id) = request {
                if let Some(r) = self.requests.iter_mut().find(|r| r.id == id) {
                    r.pending = r.pending.saturating_sub(1);
                }
                actions.extend(self.finish_requests());
            }
        } else {
            actions.push(Action::Fetch { room, after: track.delivered, limit: track.page_size });
        }
        actions
    }

    /// A fetch failed with `error` (an encoded ERROR frame; the database failed, say). A SYNC the
    /// room belonged to ends with that error; the room itself, and the request's other rooms,
    /// keep catching up, their deltas sent as pushes, so that no gap ever reaches the client.
    /// The failed fetch is retried later ([`Action::FetchLater`]), still holding pushes.
    pub fn page_failed(&mut self, room: u64, error: Bytes) -> Vec<Action> {
        let Some(track) = self.tracks.get_mut(&room) else {
            return Vec::new();
        };
        let Mode::CatchingUp { request, .. } = &mut track.mode else {
            return Vec::new();
        };
        let retry = Action::FetchLater { room, after: track.delivered, limit: track.page_size };
        let Some(id) = request.take() else {
            return vec![retry];
        };
        let Some(i) = self.requests.iter().position(|r| r.id == id) else {
            return vec![retry];
        };
        let req = self.requests.remove(i);
        for other in req.rooms {
            if let Some(Track { mode: Mode::CatchingUp { request, .. }, .. }) = self.tracks.get_mut(&other) {
                *request = None;
            }
        }
        vec![Action::Send(error), retry]
    }

    /// The connection was subscribed to `room` knowing its log only up to `after`, and the room
    /// has moved on since: fetch the rest, holding live pushes meanwhile, then go live. Nothing
    /// to do if the room is tracked already.
    pub fn catch_up(&mut self, room: u64, after: u64) -> Vec<Action> {
        if self.tracks.contains_key(&room) {
            return Vec::new();
        }
        let mode = Mode::CatchingUp { request: None, held: VecDeque::new(), overflowed: false };
        self.tracks.insert(room, Track { delivered: after, mode, page_size: DEFAULT_PAGE });
        vec![Action::Fetch { room, after, limit: DEFAULT_PAGE }]
    }

    /// The user is not a member of `room`: it gets no pages and is left out of `heads`.
    pub fn skip_room(&mut self, room: u64) -> Vec<Action> {
        let Some(track) = self.remove_track(room) else { return Vec::new() };
        let Mode::CatchingUp { request: Some(id), .. } = track.mode else { return Vec::new() };
        if let Some(r) = self.requests.iter_mut().find(|r| r.id == id) {
            r.rooms.retain(|&x| x != room);
            r.pending = r.pending.saturating_sub(1);
        }
        self.finish_requests()
    }

    /// The connection no longer receives `room` (it left): forget it.
    pub fn forget(&mut self, room: u64) {
        self.remove_track(room);
    }

    /// Bytes of pushes held while catching up.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Removes a room's track, releasing what it held.
    fn remove_track(&mut self, room: u64) -> Option<Track> {
        let track = self.tracks.remove(&room)?;
        if let Mode::CatchingUp { held, .. } = &track.mode {
            self.held_bytes -= held.iter().map(|p| p.frames.len()).sum::<usize>();
        }
        Some(track)
    }

    /// Sends SYNC_DONE for every request whose rooms are all live.
    fn finish_requests(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let tracks = &self.tracks;
        self.requests.retain(|r| {
            if r.pending > 0 {
                return true;
            }
            let heads = r
                .rooms
                .iter()
                .map(|&room| RoomCursor { room, seq: tracks.get(&room).map_or(0, |t| t.delivered) })
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
    use chime_protocol::{DeltaKind, FrameDecoder};

    fn delta(room: u64, seq: u64) -> Delta {
        Delta {
            room,
            seq,
            kind: DeltaKind::MESSAGE,
            author_id: 1,
            author: "a".into(),
            ts_ms: 0,
            text: format!("{seq}"),
        }
    }

    fn published(room: u64, seqs: std::ops::RangeInclusive<u64>) -> Published {
        let deltas: Vec<Delta> = seqs.map(|s| delta(room, s)).collect();
        Published::encode(room, &deltas).expect("non-empty range")
    }

    /// Decodes every frame sent and returns (kind, seqs): pages and pushes flattened in order.
    fn sent_seqs(actions: &[Action]) -> (Vec<u64>, usize) {
        let mut seqs = Vec::new();
        let mut dones = 0;
        let dec = FrameDecoder::default();
        for a in actions {
            if let Action::Send(b) | Action::Push(b) = a {
                let mut buf = BytesMut::from(&b[..]);
                while let Some(raw) = dec.decode(&mut buf).expect("valid") {
                    match ServerFrame::decode(&raw).expect("valid") {
                        ServerFrame::Delta(d) => seqs.push(d.seq),
                        ServerFrame::DeltaPage(p) => seqs.extend(p.deltas.iter().map(|d| d.seq)),
                        ServerFrame::SyncDone(_) => dones += 1,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        }
        (seqs, dones)
    }

    #[test]
    fn pushes_during_sync_are_held_then_deduplicated() {
        let mut s = SyncState::default();
        let a = s.start(9, &[RoomCursor { room: 1, seq: 0 }], 2);
        assert_eq!(a, vec![Action::Fetch { room: 1, after: 0, limit: 2 }]);
        // Seq 3 commits while page 1 is read; its push arrives before the page.
        assert!(s.push(&published(1, 3..=3)).is_empty());
        let a = s.page(1, 0, vec![delta(1, 1), delta(1, 2)], true);
        assert_eq!(sent_seqs(&a), (vec![1, 2], 0));
        assert_eq!(a.last(), Some(&Action::Fetch { room: 1, after: 2, limit: 2 }));
        // Seq 4 commits after page 2 was read.
        assert!(s.push(&published(1, 4..=4)).is_empty());
        let a = s.page(1, 2, vec![delta(1, 3)], false);
        assert_eq!(sent_seqs(&a), (vec![3, 4], 1));
        // Live now: a duplicate is dropped, the next one goes out.
        assert!(s.push(&published(1, 4..=4)).is_empty());
        assert_eq!(sent_seqs(&s.push(&published(1, 5..=6))), (vec![5, 6], 0));
    }

    #[test]
    fn a_live_gap_starts_a_catch_up() {
        let mut s = SyncState::default();
        s.start(1, &[RoomCursor { room: 1, seq: 0 }], 10);
        s.page(1, 0, vec![], false);
        let a = s.push(&published(1, 3..=3));
        assert_eq!(a, vec![Action::Fetch { room: 1, after: 0, limit: 10 }]);
        let a = s.page(1, 0, vec![delta(1, 1), delta(1, 2), delta(1, 3)], false);
        assert_eq!(sent_seqs(&a), (vec![1, 2, 3], 0));
    }

    #[test]
    fn held_gap_fetches_again_before_going_live() {
        let mut s = SyncState::default();
        s.start(1, &[RoomCursor { room: 1, seq: 0 }], 10);
        s.push(&published(1, 5..=5));
        let a = s.page(1, 0, vec![delta(1, 1), delta(1, 2)], false);
        assert_eq!(sent_seqs(&a), (vec![1, 2], 0));
        assert_eq!(a.last(), Some(&Action::Fetch { room: 1, after: 2, limit: 10 }));
        let a = s.page(1, 2, vec![delta(1, 3), delta(1, 4), delta(1, 5)], false);
        assert_eq!(sent_seqs(&a), (vec![3, 4, 5], 1));
    }

    #[test]
    fn non_member_rooms_are_left_out() {
        let mut s = SyncState::default();
        s.start(4, &[RoomCursor { room: 1, seq: 0 }, RoomCursor { room: 2, seq: 0 }], 10);
        assert!(s.skip_room(2).is_empty());
        let a = s.page(1, 0, vec![delta(1, 1)], false);
        assert_eq!(sent_seqs(&a), (vec![1], 1));
        let Some(Action::Send(done)) = a.last() else { panic!("no SYNC_DONE") };
        let raw = FrameDecoder::default().decode(&mut BytesMut::from(&done[..])).unwrap().unwrap();
        let ServerFrame::SyncDone(d) = ServerFrame::decode(&raw).unwrap() else { panic!("not SYNC_DONE") };
        assert_eq!(d.heads, vec![RoomCursor { room: 1, seq: 1 }]);
    }

    #[test]
    fn a_late_subscription_catches_up_then_goes_live() {
        let mut s = SyncState::default();
        // Subscribed knowing seq 3; the loop had already published up to 5.
        assert_eq!(s.catch_up(1, 3), vec![Action::Fetch { room: 1, after: 3, limit: DEFAULT_PAGE }]);
        assert!(s.push(&published(1, 6..=6)).is_empty());
        let a = s.page(1, 3, vec![delta(1, 4), delta(1, 5)], false);
        assert_eq!(sent_seqs(&a), (vec![4, 5, 6], 0));
        assert_eq!(sent_seqs(&s.push(&published(1, 7..=7))), (vec![7], 0));
        assert!(s.catch_up(1, 0).is_empty(), "already tracked");
    }

    #[test]
    fn untracked_rooms_pass_through() {
        let mut s = SyncState::default();
        assert_eq!(sent_seqs(&s.push(&published(2, 7..=8))), (vec![7, 8], 0));
    }

    #[test]
    fn stale_pages_are_ignored_and_failures_end_the_request() {
        let mut s = SyncState::default();
        s.start(1, &[RoomCursor { room: 1, seq: 0 }, RoomCursor { room: 2, seq: 0 }], 10);
        s.start(2, &[RoomCursor { room: 1, seq: 5 }], 10);
        assert!(s.page(1, 0, vec![delta(1, 1)], false).is_empty());
        let err = Bytes::from_static(b"err");
        let retry = Action::FetchLater { room: 2, after: 0, limit: 10 };
        assert_eq!(s.page_failed(2, err.clone()), vec![Action::Send(err), retry]);
        let a = s.page(1, 5, vec![delta(1, 6)], false);
        assert_eq!(sent_seqs(&a), (vec![6], 1));
        // Room 2 keeps catching up after its request ended: its deltas arrive as pushes, gap-free.
        assert!(s.push(&published(2, 3..=3)).is_empty());
        let a = s.page(2, 0, vec![delta(2, 1), delta(2, 2)], false);
        assert_eq!(sent_seqs(&a), (vec![1, 2, 3], 0));
        assert!(a.iter().all(|a| !matches!(a, Action::Send(b) if b.starts_with(b"err"))));
    }

    #[test]
    fn a_failed_catch_up_is_retried_not_dropped() {
        let mut s = SyncState::default();
        assert_eq!(s.catch_up(4, 2), vec![Action::Fetch { room: 4, after: 2, limit: DEFAULT_PAGE }]);
        let retry = Action::FetchLater { room: 4, after: 2, limit: DEFAULT_PAGE };
        assert_eq!(s.page_failed(4, Bytes::from_static(b"err")), vec![retry]);
        // Still held, still gap-checked: a push is not sent raw.
        assert!(s.push(&published(4, 5..=5)).is_empty());
        let a = s.page(4, 2, vec![delta(4, 3), delta(4, 4)], false);
        assert_eq!(sent_seqs(&a), (vec![3, 4, 5], 0));
    }

    #[test]
    fn held_pushes_are_bounded_in_bytes() {
        let mut s = SyncState::default();
        s.start(1, &[RoomCursor { room: 1, seq: 0 }], 10);
        let big = |seq: u64| {
            let mut d = delta(1, seq);
            d.text = "x".repeat(60_000);
            Published::encode(1, &[d]).expect("one delta")
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
        let a = s.page(1, 0, vec![], false);
        assert!(matches!(a.last(), Some(Action::Fetch { room: 1, .. })), "{a:?}");
        s.forget(1);
        assert_eq!(s.held_bytes(), 0);
    }
}
