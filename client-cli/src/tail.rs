//! `tail ROOM... [--after SEQ]`: catch up, then follow live pushes until killed.
//!
//! The durable per-room log is the source of truth and pushes are only a shortcut to it. `tail`
//! remembers the last seq it printed per room ([`Cursors`]) and prints a delta only when it is
//! exactly the next one, so across reconnects, daemon restarts and dropped pushes every delta is
//! printed once and in order:
//!
//! - on every (re)connection it resumes the session and SYNCs from the last printed seqs;
//! - a push at or below the last printed seq is a duplicate and is dropped;
//! - a push that skips ahead means pushes were lost, so it SYNCs that room to fill the gap first;
//! - when nothing arrives for a heartbeat interval it SYNCs all rooms, which both proves the
//!   connection is alive (a half-open one fails the request) and picks up any lost last push;
//! - any failure that a reconnect may cure (lost connection, GOODBYE, timeout, a retryable server
//!   error) leads to a reconnect after an exponential backoff with jitter capped at 2 s.

use crate::connect::{describe, CallError, Ctx};
use anyhow::anyhow;
use chime_client::backoff::Backoff;
use chime_client::blocking::{Client, ClientError};
use chime_protocol::{Delta, ErrorCode, RoomCursor, ServerFrame};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::time::{Duration, Instant};

/// Deltas per SYNC page.
const SYNC_PAGE: u32 = 500;
/// The first reconnect delay.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The longest reconnect delay.
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// The idle interval when the server announces no heartbeat.
const DEFAULT_IDLE: Duration = Duration::from_secs(15);

/// What to do with a delta, given what was printed already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It is the next one of its room: print it.
    Next,
    /// Already printed: drop it.
    Seen,
    /// Deltas are missing before it; holds the last printed seq to catch up from.
    Gap(u64),
    /// Not a room being followed.
    Elsewhere,
}

/// The last printed seq of each followed room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursors {
    /// Room id to last printed seq (0 before any).
    last: BTreeMap<u64, u64>,
}

impl Cursors {
    /// Cursors from `(room, last seq)` pairs.
    pub fn new(rooms: impl IntoIterator<Item = (u64, u64)>) -> Self {
        Cursors { last: rooms.into_iter().collect() }
    }

    /// Judges `delta` against what was printed.
    pub fn judge(&self, delta: &Delta) -> Verdict {
        match self.last.get(&delta.room) {
            None => Verdict::Elsewhere,
            Some(&last) if delta.seq <= last => Verdict::Seen,
            Some(&last) if delta.seq == last + 1 => Verdict::Next,
            Some(&last) => Verdict::Gap(last),
        }
    }

    /// Records that `delta` was printed.
    pub fn printed(&mut self, delta: &Delta) {
        if let Some(last) = self.last.get_mut(&delta.room) {
            *last = (*last).max(delta.seq);
        }
    }

    /// The SYNC cursors for every room.
    pub fn all(&self) -> Vec<RoomCursor> {
        self.last.iter().map(|(&room, &seq)| RoomCursor { room, seq }).collect()
    }
}

/// Runs `tail` until killed or until a failure no reconnect can cure.
pub fn run(ctx: &mut Ctx, rooms: &[u64], after: Option<u64>) -> Result<(), CallError> {
    let mut rooms = rooms.to_vec();
    rooms.sort_unstable();
    rooms.dedup();
    let mut cursors = after.map(|seq| Cursors::new(rooms.iter().map(|&room| (room, seq))));
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut failing = false;
    loop {
        let Err(e) = follow(ctx, &rooms, &mut cursors, &mut backoff, &mut failing);
        if !worth_reconnecting(&e) {
            return Err(e);
        }
        let delay = backoff.next_delay();
        let why = match &e {
            CallError::Client(c) => describe(c, &ctx.server),
            CallError::Local(l) => format!("{l:#}"),
        };
        log::warn!("{why}; reconnecting in {} ms", delay.as_millis());
        failing = true;
        std::thread::sleep(delay);
    }
}

/// Whether a reconnect may cure `err`: a lost or closed connection, a timeout, a garbled stream,
/// or a server refusal marked retryable. A refused session, a fingerprint mismatch, a room the user
/// is not in, or a failing stdout are for the user to fix.
fn worth_reconnecting(err: &CallError) -> bool {
    match err {
        CallError::Local(_) => false,
        CallError::Client(ClientError::Server(body)) => {
            body.retryable || body.code == ErrorCode::RESYNC_REQUIRED || body.code == ErrorCode::SHUTTING_DOWN
        }
        CallError::Client(ClientError::FingerprintMismatch { .. }) => false,
        CallError::Client(_) => true,
    }
}

/// One connection's life: connect, resume, catch up, follow. Returns only with the failure
/// that ended it.
fn follow(
    ctx: &mut Ctx,
    rooms: &[u64],
    cursors: &mut Option<Cursors>,
    backoff: &mut Backoff,
    failing: &mut bool,
) -> Result<Infallible, CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let cursors = match cursors {
        Some(cursors) => cursors,
        None => cursors.insert(current_heads(ctx, &mut client, rooms)?),
    };
    catch_up(ctx, &mut client, cursors, &cursors.all())?;
    backoff.reset();
    if std::mem::take(failing) {
        log::warn!("reconnected to {}", ctx.server);
    }

    let heartbeat = client.welcome().heartbeat_secs;
    let idle =
        if heartbeat == 0 { DEFAULT_IDLE } else { Duration::from_secs(u64::from(heartbeat)).min(DEFAULT_IDLE * 2) };
    let mut deadline = Instant::now() + idle;
    loop {
        let now = Instant::now();
        if now >= deadline {
            catch_up(ctx, &mut client, cursors, &cursors.all())?;
            deadline = Instant::now() + idle;
            continue;
        }
        // Never a zero wait: a zero socket timeout means "block forever" or an error to std.
        let wait = (deadline - now).max(Duration::from_millis(1));
        let Some((_, ServerFrame::Delta(delta))) = client.recv(Some(wait))? else {
            // A timeout, or a frame tail has no use for (heartbeats are the client's business).
            continue;
        };
        match cursors.judge(&delta) {
            Verdict::Next => {
                ctx.out.delta(&delta)?;
                cursors.printed(&delta);
                deadline = Instant::now() + idle;
            }
            Verdict::Gap(last) => {
                let cursor = RoomCursor { room: delta.room, seq: last };
                catch_up(ctx, &mut client, cursors, &[cursor])?;
                // The catch-up normally reaches this delta and prints it. If the log does not
                // hold it yet, it is not printed out of order here; the idle SYNC fetches it.
                if cursors.judge(&delta) == Verdict::Next {
                    ctx.out.delta(&delta)?;
                    cursors.printed(&delta);
                }
                deadline = Instant::now() + idle;
            }
            Verdict::Seen | Verdict::Elsewhere => {}
        }
    }
}

/// The head seq of each followed room, for a `tail` without `--after` (only new deltas).
fn current_heads(ctx: &Ctx, client: &mut Client, rooms: &[u64]) -> Result<Cursors, CallError> {
    let heads: BTreeMap<u64, u64> = client.list_rooms()?.into_iter().map(|info| (info.room, info.head_seq)).collect();
    let mut start = Vec::with_capacity(rooms.len());
    for &room in rooms {
        let Some(&head) = heads.get(&room) else {
            return Err(CallError::Local(anyhow!(
                "{} says you are not a member of room {room} (run `chime room join {room}`)",
                ctx.server
            )));
        };
        start.push((room, head));
    }
    Ok(Cursors::new(start))
}

/// SYNCs `from` and prints every delta that is the next of its room.
fn catch_up(ctx: &mut Ctx, client: &mut Client, cursors: &mut Cursors, from: &[RoomCursor]) -> Result<(), CallError> {
    let mut failed: Option<io::Error> = None;
    let out = &mut ctx.out;
    let synced = client.sync(from, SYNC_PAGE, &mut |delta: &Delta| {
        if failed.is_none() && cursors.judge(delta) == Verdict::Next {
            match out.delta(delta) {
                Ok(()) => cursors.printed(delta),
                Err(e) => failed = Some(e),
            }
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    synced?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chime_protocol::DeltaKind;

    fn delta(room: u64, seq: u64) -> Delta {
        Delta {
            room,
            seq,
            kind: DeltaKind::MESSAGE,
            author_id: 1,
            author: "alice".into(),
            ts_ms: 0,
            text: format!("m{seq}"),
        }
    }

    #[test]
    fn only_the_next_delta_of_a_followed_room_prints() {
        let mut cursors = Cursors::new([(1, 0), (2, 10)]);
        assert_eq!(cursors.judge(&delta(1, 1)), Verdict::Next);
        assert_eq!(cursors.judge(&delta(1, 3)), Verdict::Gap(0));
        assert_eq!(cursors.judge(&delta(2, 10)), Verdict::Seen);
        assert_eq!(cursors.judge(&delta(2, 11)), Verdict::Next);
        assert_eq!(cursors.judge(&delta(3, 1)), Verdict::Elsewhere);
        cursors.printed(&delta(1, 1));
        assert_eq!(cursors.judge(&delta(1, 1)), Verdict::Seen);
        assert_eq!(cursors.judge(&delta(1, 2)), Verdict::Next);
        assert_eq!(cursors.all(), [RoomCursor { room: 1, seq: 1 }, RoomCursor { room: 2, seq: 10 }]);
    }

    #[test]
    fn a_replayed_stream_prints_each_delta_once_in_order() {
        // What tail sees across a reconnect: a live push that skips ahead, the catch-up that
        // fills the gap, then a replay of deltas already printed.
        let mut cursors = Cursors::new([(1, 0)]);
        let mut printed = Vec::new();
        for seq in [1, 2, 4, 3, 4, 5, 2, 3, 4, 5, 6] {
            let d = delta(1, seq);
            if cursors.judge(&d) == Verdict::Next {
                cursors.printed(&d);
                printed.push(seq);
            }
        }
        assert_eq!(printed, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn reconnect_policy() {
        use chime_protocol::ErrorBody;
        let server = |code| CallError::Client(ClientError::Server(ErrorBody::new(code, "x")));
        assert!(worth_reconnecting(&CallError::Client(ClientError::Timeout)));
        assert!(worth_reconnecting(&CallError::Client(ClientError::Closed(None))));
        assert!(worth_reconnecting(&server(ErrorCode::SHUTTING_DOWN)));
        assert!(worth_reconnecting(&server(ErrorCode::OVERLOADED)));
        assert!(!worth_reconnecting(&server(ErrorCode::NOT_MEMBER)));
        assert!(!worth_reconnecting(&CallError::Local(anyhow!("not logged in"))));
    }
}
