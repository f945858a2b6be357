//! `tail ROOM... [--after SEQ]`: catch up, then follow live pushes until killed.
//!
//! The durable per-room log is the source of truth and pushes are only a shortcut to it. `tail`
//! follows its rooms with the client session ([`chime_client::Session::follow`]), which turns SYNC
//! pages and pushes into one stream holding every delta of a room once and in seq order: it drops
//! duplicates, and when a push skips ahead it SYNCs the room from the last delta delivered before
//! going on. `tail` prints what the session delivers and remembers the last printed seq of each
//! room, so across reconnects, daemon restarts and dropped pushes every delta is printed once and
//! in order:
//!
//! - on every (re)connection it resumes the session, follows the rooms from the last printed seqs
//!   and SYNCs them;
//! - when nothing is printed for a heartbeat interval it SYNCs all rooms, which both proves the
//!   connection is alive (a half-open one leaves the SYNC unanswered, and that fails after the
//!   reply timeout) and picks up a lost last push, which no later push would show as a gap;
//! - any failure that a reconnect may cure (lost connection, GOODBYE, timeout, a retryable server
//!   error) leads to a reconnect after an exponential backoff with jitter capped at 2 s.

use crate::connect::{describe, CallError, Ctx};
use anyhow::anyhow;
use chime_client::backoff::Backoff;
use chime_client::blocking::{Client, ClientError};
use chime_client::Event;
use chime_protocol::{ErrorCode, RoomId, Seq, ServerFrame};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

/// The first reconnect delay.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The longest reconnect delay.
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// The idle interval when the server announces no heartbeat.
const DEFAULT_IDLE: Duration = Duration::from_secs(15);

/// Runs `tail` until killed or until a failure no reconnect can cure.
pub fn run(ctx: &mut Ctx, rooms: &[u64], after: Option<u64>) -> Result<(), CallError> {
    let mut rooms = rooms.to_vec();
    rooms.sort_unstable();
    rooms.dedup();
    // Room id to the last printed seq (0 before any); kept across connections.
    let mut printed: Option<BTreeMap<u64, u64>> = after.map(|seq| rooms.iter().map(|&room| (room, seq)).collect());
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut failing = false;
    loop {
        let Err(e) = follow(ctx, &rooms, &mut printed, &mut backoff, &mut failing);
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
    printed: &mut Option<BTreeMap<u64, u64>>,
    backoff: &mut Backoff,
    failing: &mut bool,
) -> Result<Infallible, CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let printed = match printed {
        Some(printed) => printed,
        None => printed.insert(current_heads(ctx, &mut client, rooms)?),
    };
    for (&room, &seq) in printed.iter() {
        client.follow(RoomId(room), Seq(seq));
    }
    let reply_timeout = client.timeout();
    let heartbeat = client.welcome().limits.heartbeat_secs;
    let idle =
        if heartbeat == 0 { DEFAULT_IDLE } else { Duration::from_secs(u64::from(heartbeat)).min(DEFAULT_IDLE * 2) };
    // The catch-up SYNC in flight, and when it last showed progress (sent, or a page came).
    let mut catch_up = client.sync_followed()?.map(|id| (id, Instant::now()));
    let mut deadline = Instant::now() + idle;
    loop {
        let now = Instant::now();
        if let Some((_, progress)) = catch_up {
            if now >= progress + reply_timeout {
                return Err(ClientError::Timeout.into());
            }
        }
        if now >= deadline {
            if catch_up.is_none() {
                catch_up = client.sync_followed()?.map(|id| (id, now));
            }
            deadline = now + idle;
            continue;
        }
        let until = catch_up.map_or(deadline, |(_, progress)| deadline.min(progress + reply_timeout));
        // Never a zero wait: a zero socket timeout means "block forever" or an error to std.
        let wait = until.saturating_duration_since(now).max(Duration::from_millis(1));
        let Some(event) = client.next_event(Some(wait))? else { continue };
        match event {
            // The next delta of its room, from a push or a page (the session saw to that), or a
            // push of a room the user is in but tail does not follow.
            Event::Delta { delta, .. } => {
                let Some(last) = printed.get_mut(&delta.room.get()) else { continue };
                ctx.out.delta(&delta)?;
                *last = delta.seq.get();
                deadline = Instant::now() + idle;
            }
            Event::Reply { request_id, frame } if catch_up.is_some_and(|(id, _)| id == request_id) => {
                if let ServerFrame::SyncDone(_) = frame {
                    catch_up = None;
                    backoff.reset();
                    if std::mem::take(failing) {
                        log::warn!("reconnected to {}", ctx.server);
                    }
                } else {
                    catch_up = Some((request_id, Instant::now()));
                }
            }
            Event::Gap { room, cursor, seq, .. } => {
                log::debug!("room {room}: push {seq} after {cursor}; the session SYNCs the gap");
            }
            // tail only asks for SYNCs, and so does the session besides PINGs, which are always
            // answered PONG: a refusal with a request id is a refused SYNC.
            Event::Failed { request_id, error } if request_id != 0 => return Err(ClientError::Server(error).into()),
            Event::Goodbye(goodbye) => return Err(ClientError::Closed(Some(goodbye)).into()),
            Event::Invalid { error, .. } => return Err(ClientError::from(error).into()),
            // An ERROR without a request id comes before the server closes, which says it all; other
            // replies answer nothing tail waits for, and other pushes (settings) are not its business.
            Event::Failed { .. } | Event::Reply { .. } | Event::Push(_) | Event::Connected(_) => {}
        }
    }
}

/// The head seq of each followed room, for a `tail` without `--after` (only new deltas).
fn current_heads(ctx: &Ctx, client: &mut Client, rooms: &[u64]) -> Result<BTreeMap<u64, u64>, CallError> {
    let heads: BTreeMap<u64, u64> =
        client.list_rooms()?.into_iter().map(|info| (info.room.get(), info.head_seq.get())).collect();
    let mut start = BTreeMap::new();
    for &room in rooms {
        let Some(&head) = heads.get(&room) else {
            return Err(CallError::Local(anyhow!(
                "{} says you are not a member of room {room} (run `chime room join {room}`)",
                ctx.server
            )));
        };
        start.insert(room, head);
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

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
