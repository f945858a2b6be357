//! `send`, `history`, `restore`, the message actions (`edit`, `delete`, `react`, `reply`, `pin`),
//! `view` and `search`.
//!
//! `send` (and `edit`, `reply`) picks one idempotency key and reuses it for every retry,
//! reconnecting when the connection was lost, so a post that reached the server before the
//! connection broke is answered with its first seq instead of being written twice.

use crate::connect::{CallError, Ctx};
use anyhow::anyhow;
use chime_client::backoff::Backoff;
use chime_client::blocking::{new_idempotency_key, Client, ClientError};
use chime_protocol::{Posted, RestoreOrder, RoomId, Seq};
use serde_json::json;
use std::time::Duration;

/// How many times `send` tries before giving up.
const SEND_ATTEMPTS: u32 = 5;
/// Deltas asked for per HISTORY request; the server may cap it lower.
const HISTORY_PAGE: u64 = 500;

/// `send ROOM TEXT...`: posts the words joined by spaces; prints once the post is durable.
pub fn send(ctx: &mut Ctx, room: u64, words: &[String]) -> Result<(), CallError> {
    let (text, key) = (words.join(" "), new_idempotency_key());
    let posted = retrying(ctx, |c| c.post(RoomId(room), &key, &text))?;
    print_posted(ctx, &posted, "sent to")
}

/// `edit ROOM SEQ TEXT...`: replaces the text of message SEQ with a new `EDIT` delta.
pub fn edit(ctx: &mut Ctx, room: u64, seq: u64, words: &[String]) -> Result<(), CallError> {
    let (text, key) = (words.join(" "), new_idempotency_key());
    let posted = retrying(ctx, |c| c.edit(RoomId(room), Seq(seq), &key, &text))?;
    print_posted(ctx, &posted, &format!("edited message {seq} in"))
}

/// `reply ROOM SEQ TEXT...`: posts an answer to message SEQ.
pub fn reply(ctx: &mut Ctx, room: u64, seq: u64, words: &[String]) -> Result<(), CallError> {
    let (text, key) = (words.join(" "), new_idempotency_key());
    let posted = retrying(ctx, |c| c.reply(RoomId(room), Seq(seq), &key, &text))?;
    print_posted(ctx, &posted, &format!("replied to message {seq} in"))
}

/// `delete ROOM SEQ`: deletes message SEQ with a new `DELETE` delta (a repeat changes nothing).
pub fn delete(ctx: &mut Ctx, room: u64, seq: u64) -> Result<(), CallError> {
    let posted = retrying(ctx, |c| c.delete(RoomId(room), Seq(seq)))?;
    print_posted(ctx, &posted, &format!("deleted message {seq} in"))
}

/// `react ROOM SEQ EMOJI [--remove]`.
pub fn react(ctx: &mut Ctx, room: u64, seq: u64, emoji: &str, remove: bool) -> Result<(), CallError> {
    let posted = retrying(ctx, |c| c.react(RoomId(room), Seq(seq), emoji, remove))?;
    let did = if remove { "took back" } else { "added" };
    print_posted(ctx, &posted, &format!("{did} {emoji} on message {seq} in"))
}

/// `pin ROOM SEQ [--remove]`.
pub fn pin(ctx: &mut Ctx, room: u64, seq: u64, remove: bool) -> Result<(), CallError> {
    let posted = retrying(ctx, |c| c.pin(RoomId(room), Seq(seq), remove))?;
    let did = if remove { "unpinned" } else { "pinned" };
    print_posted(ctx, &posted, &format!("{did} message {seq} in"))
}

pub(super) fn print_posted(ctx: &mut Ctx, posted: &Posted, what: &str) -> Result<(), CallError> {
    let note = if posted.duplicate { " (already done)" } else { "" };
    ctx.out.record(
        &json!({"room": posted.room, "seq": posted.seq}),
        &format!("{what} #{} as seq {}{note}", posted.room, posted.seq),
    )?;
    Ok(())
}

/// Runs `call` until it succeeds, up to `SEND_ATTEMPTS` times, reconnecting when the connection
/// was lost. Every request it is used for is safe to repeat: posts, edits and replies carry one
/// idempotency key for all attempts, and deletes, reactions and pins answer a repeat with the
/// seq that made the state.
fn retrying<T>(ctx: &mut Ctx, mut call: impl FnMut(&mut Client) -> Result<T, ClientError>) -> Result<T, CallError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut client: Option<Client> = None;
    let mut attempt = 1;
    loop {
        let result = match &mut client {
            Some(c) => call(c).map_err(CallError::from),
            None => ctx.connect_authed().and_then(|(c, _)| call(client.insert(c)).map_err(CallError::from)),
        };
        match result {
            Ok(value) => return Ok(value),
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
    }
}

/// `view ROOM [--limit N]`: the newest N messages in their current state, oldest first.
pub fn view(ctx: &mut Ctx, room: u64, limit: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let mut messages = Vec::new();
    let mut before = Seq::ZERO;
    while (messages.len() as u64) < limit {
        let ask = u32::try_from((limit - messages.len() as u64).min(HISTORY_PAGE)).unwrap_or(u32::MAX);
        let page = client.view(RoomId(room), before, ask)?;
        messages.extend(page.messages);
        match page.next_before {
            Some(next) if next < before || before == Seq::ZERO => before = next,
            Some(_) => {
                return Err(CallError::Local(anyhow!(
                    "{} sent a VIEW page for room {room} that does not go back past seq {before}",
                    ctx.server
                )))
            }
            None => break,
        }
    }
    messages.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    for m in messages.iter().rev() {
        ctx.out.message(RoomId(room), m)?;
    }
    Ok(())
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

fn unread_json(s: &chime_protocol::ReadState) -> serde_json::Value {
    json!({"room": s.room, "unread": s.unread, "mentions": s.mentions, "read": s.read, "head": s.head})
}

fn unread_human(s: &chime_protocol::ReadState) -> String {
    format!(
        "#{}: {} unread, {} mention{} (read up to {} of {})",
        s.room,
        s.unread,
        s.mentions,
        if s.mentions == 1 { "" } else { "s" },
        s.read,
        s.head
    )
}

/// `read ROOM SEQ`: marks the room read up to SEQ; every device of the user hears of it.
pub fn read(ctx: &mut Ctx, room: u64, seq: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let state = client.receipt(RoomId(room), Seq(seq), Seq(seq))?;
    ctx.out.record(&unread_json(&state), &unread_human(&state))?;
    Ok(())
}

/// `unread`: one line per room with unread messages or mentions.
pub fn unread(ctx: &mut Ctx) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let mut after = RoomId(0);
    loop {
        let page = client.unread(after, 0)?;
        for s in &page.rooms {
            ctx.out.record(&unread_json(s), &unread_human(s))?;
        }
        match page.next_after {
            Some(next) if next > after => after = next,
            _ => return Ok(()),
        }
    }
}

/// `notifications`: the messages that mention the user, newest first.
pub fn notifications(ctx: &mut Ctx, limit: u32) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let list = client.notifications(limit)?;
    for n in &list.notifications {
        ctx.out.record(
            &json!({
                "room": n.room, "seq": n.seq, "author": n.author, "ts": crate::output::rfc3339_ms(n.ts_ms),
                "text": n.text, "read": n.read,
            }),
            &format!(
                "[#{} {}] {} {}: {}{}",
                n.room,
                n.seq,
                crate::output::rfc3339_ms(n.ts_ms),
                n.author,
                n.text.as_deref().unwrap_or("(deleted)"),
                if n.read { "" } else { " (new)" }
            ),
        )?;
    }
    Ok(())
}

/// `call ROOM invite|accept|end [--call SEQ] [--data D]`.
pub fn call(ctx: &mut Ctx, room: u64, action: &str, call: u64, data: &str) -> Result<(), CallError> {
    let action = match action {
        "invite" => chime_protocol::CallAction::INVITE,
        "accept" => chime_protocol::CallAction::ACCEPT,
        _ => chime_protocol::CallAction::END,
    };
    let (mut client, _) = ctx.connect_authed()?;
    let posted = client.call(RoomId(room), action, Seq(call), data)?;
    print_posted(ctx, &posted, "call signalled in")
}
/// `restore ROOM [--newest-first] [--page N]`: the room's whole log, every delta once, in order,
/// page after page of RESTORE; the client library waits out the server's rate limit.
pub fn restore(ctx: &mut Ctx, room: u64, newest_first: bool, page: Option<u32>) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let order = if newest_first { RestoreOrder::NEWEST_FIRST } else { RestoreOrder::OLDEST_FIRST };
    let page = page.unwrap_or(client.welcome().limits.max_page);
    let out = &mut ctx.out;
    let done =
        client.restore_all(RoomId(room), order, page, &mut |delta| out.delta(delta).map_err(ClientError::from))?;
    log::info!(
        "restored {} deltas of room {room} (head {}) in {} pages, {} waits for the rate limit",
        done.deltas,
        done.head,
        done.pages,
        done.waits
    );
    Ok(())
}

/// `search ROOM QUERY... [--limit N]`: the newest N messages that contain every word, newest
/// first, in their current state.
pub fn search(ctx: &mut Ctx, room: u64, words: &[String], limit: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let query = words.join(" ");
    let mut before = Seq::ZERO;
    let mut printed = 0u64;
    while printed < limit {
        let ask = u32::try_from((limit - printed).min(HISTORY_PAGE)).unwrap_or(u32::MAX);
        let page = client.search(RoomId(room), &query, before, ask)?;
        for m in page.messages.iter().take(usize::try_from(limit - printed).unwrap_or(usize::MAX)) {
            ctx.out.message(RoomId(room), m)?;
            printed += 1;
        }
        match page.next_before {
            Some(next) if next < before || before == Seq::ZERO => before = next,
            Some(_) => {
                return Err(CallError::Local(anyhow!(
                    "{} sent a SEARCH page for room {room} that does not go back past seq {before}",
                    ctx.server
                )))
            }
            None => break,
        }
    }
    Ok(())
}
