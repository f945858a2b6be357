//! `send` and `history`.
//!
//! `send` picks one idempotency key and reuses it for every retry, reconnecting when the
//! connection was lost, so a post that reached the server before the connection broke is
//! answered with its first seq instead of being written twice.

use crate::connect::{CallError, Ctx};
use anyhow::anyhow;
use chime_client::backoff::Backoff;
use chime_client::blocking::{new_idempotency_key, Client, ClientError};
use chime_protocol::{Posted, RoomId, Seq};
use serde_json::json;
use std::time::Duration;

/// How many times `send` tries before giving up.
const SEND_ATTEMPTS: u32 = 5;
/// Deltas asked for per HISTORY request; the server may cap it lower.
const HISTORY_PAGE: u64 = 500;

/// `send ROOM TEXT...`: posts the words joined by spaces; prints once the post is durable.
pub fn send(ctx: &mut Ctx, room: u64, words: &[String]) -> Result<(), CallError> {
    let text = words.join(" ");
    let key = new_idempotency_key();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut client = None;
    let mut attempt = 1;
    let posted = loop {
        match post_once(ctx, &mut client, room, &key, &text) {
            Ok(posted) => break posted,
            Err(e) if e.is_retryable() && attempt < SEND_ATTEMPTS => {
                // A refusal the server marked retryable came over a working connection; any
                // other failure may have left the connection unusable.
                if !matches!(e, CallError::Client(ClientError::Server(_))) {
                    client = None;
                }
                let delay = backoff.next_delay();
                log::info!("attempt {attempt} of {SEND_ATTEMPTS} failed ({}); retrying in {delay:?}", ctx.explain(e));
                std::thread::sleep(delay);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    ctx.out.record(
        &json!({"room": posted.room, "seq": posted.seq}),
        &format!("sent to #{} as seq {}", posted.room, posted.seq),
    )?;
    Ok(())
}

/// One POST, connecting and resuming first if there is no connection.
fn post_once(ctx: &Ctx, client: &mut Option<Client>, room: u64, key: &str, text: &str) -> Result<Posted, CallError> {
    let connected = match client {
        Some(connected) => connected,
        None => client.insert(ctx.connect_authed()?.0),
    };
    Ok(connected.post(RoomId(room), key, text)?)
}

/// `history ROOM [--after SEQ] [--limit N]`: deltas oldest first, page after page.
pub fn history(ctx: &mut Ctx, room: u64, after: u64, limit: Option<u64>) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let mut after = after;
    let mut remaining = limit.unwrap_or(u64::MAX);
    while remaining > 0 {
        let ask = u32::try_from(remaining.min(HISTORY_PAGE)).unwrap_or(u32::MAX);
        let page = client.history(RoomId(room), Seq(after), ask)?;
        for delta in &page.deltas {
            if remaining == 0 {
                break;
            }
            ctx.out.delta(delta)?;
            remaining -= 1;
        }
        if !page.more {
            break;
        }
        if page.resume_after.get() <= after {
            // Asking again from the same place would loop forever.
            return Err(CallError::Local(anyhow!(
                "{} sent a HISTORY page for room {room} that does not advance past seq {after}",
                ctx.server
            )));
        }
        after = page.resume_after.get();
    }
    Ok(())
}
