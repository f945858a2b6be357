//! Acting on messages: EDIT, DELETE, REACT, REPLY and PIN, which append a delta that refers to an
//! earlier message, and VIEW, which reads messages in their current state.
//!
//! The writes run on the room's shard ([`Work::Room`]): they append to its log, so they are
//! published in seq order with its posts. The store judges each against the actor's role in the
//! same transaction that writes it (`chime_storage::actions`), so a permission cannot change
//! between the check and the write. Repeats that change nothing (a second delete, a reaction
//! already there, a retried edit) answer the seq that made the state, marked `duplicate`, and
//! publish nothing.

use super::{invalid, page_size, Admitted, Ctx};
use crate::limits::{MAX_EMOJI, MAX_KEY, MAX_TEXT, PAGE_TEXT_BUDGET};
use crate::work::{refuse, reply, store_error, Actor, Effect, ReplyTo, RoomWork, Settings, SharedWork, Work};
use chime_protocol::{
    Call, CallAction, DeleteMessage, Edit, ErrorBody, MessagePage, MessageView, Pin, Posted, React, ReactionCount,
    Reply, ServerFrame, View,
};
use chime_storage::{
    now_ms, ActionOutcome, MessageAction, MessageRecord, NewAction, RecordKind, RoomId, Seq, SharedStore, Store,
};

/// A message's text: 1 to 16,384 bytes (POST, EDIT, REPLY).
pub(super) fn check_text(text: &str) -> Result<(), ErrorBody> {
    if text.is_empty() || text.len() > MAX_TEXT {
        return Err(invalid(format!("text must be 1 to {MAX_TEXT} bytes")));
    }
    Ok(())
}

/// An idempotency key: 1 to 64 bytes (POST, EDIT, REPLY).
pub(super) fn check_key(key: &str) -> Result<(), ErrorBody> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(invalid(format!("idempotency key must be 1 to {MAX_KEY} bytes")));
    }
    Ok(())
}

/// A reaction is one short symbol: no spaces or control characters, at most 32 bytes.
fn check_emoji(emoji: &str) -> Result<(), ErrorBody> {
    if emoji.is_empty() || emoji.len() > MAX_EMOJI || emoji.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(format!("a reaction is 1 to {MAX_EMOJI} bytes with no spaces or control characters")));
    }
    Ok(())
}

fn check_target(target: Seq) -> Result<(), ErrorBody> {
    if target == Seq::ZERO {
        return Err(invalid("seq 0 is no message"));
    }
    Ok(())
}

fn act(ctx: &Ctx<'_>, room: RoomId, target: Seq, action: MessageAction, key: String) -> Result<Admitted, ErrorBody> {
    check_target(target)?;
    let action = NewAction {
        room,
        target,
        actor: ctx.who.actor.user_id,
        actor_name: ctx.who.actor.name.to_string(),
        action,
        idempotency_key: key,
        now_ms: 0,
    };
    Ok(Admitted::Work(Work::Room(Box::new(ActJob { to: ctx.to, action }))))
}

/// Admits EDIT: a text and a key as for POST.
pub fn edit(ctx: &mut Ctx<'_>, e: Edit) -> Result<Admitted, ErrorBody> {
    check_text(&e.text)?;
    check_key(&e.idempotency_key)?;
    act(ctx, e.room, e.target, MessageAction::Edit { text: e.text }, e.idempotency_key)
}

/// Admits DELETE.
pub fn delete(ctx: &mut Ctx<'_>, d: DeleteMessage) -> Result<Admitted, ErrorBody> {
    act(ctx, d.room, d.target, MessageAction::Delete, String::new())
}

/// Admits REACT: one emoji.
pub fn react(ctx: &mut Ctx<'_>, r: React) -> Result<Admitted, ErrorBody> {
    check_emoji(&r.emoji)?;
    let action =
        if r.remove { MessageAction::Unreact { emoji: r.emoji } } else { MessageAction::React { emoji: r.emoji } };
    act(ctx, r.room, r.target, action, String::new())
}

/// Admits REPLY: a text and a key as for POST.
pub fn reply_to(ctx: &mut Ctx<'_>, r: Reply) -> Result<Admitted, ErrorBody> {
    check_text(&r.text)?;
    check_key(&r.idempotency_key)?;
    act(ctx, r.room, r.reply_to, MessageAction::Reply { text: r.text }, r.idempotency_key)
}

/// Admits PIN.
pub fn pin(ctx: &mut Ctx<'_>, p: Pin) -> Result<Admitted, ErrorBody> {
    let action = if p.remove { MessageAction::Unpin } else { MessageAction::Pin };
    act(ctx, p.room, p.target, action, String::new())
}

/// Most bytes of a call's opaque signalling.
const MAX_CALL_DATA: usize = 8 * 1024;

/// Admits CALL: a known action, its call named for ACCEPT and END, bounded signalling data.
pub fn call(ctx: &mut Ctx<'_>, c: Call) -> Result<Admitted, ErrorBody> {
    let kind = match c.action {
        CallAction::INVITE => RecordKind::CALL_INVITE,
        CallAction::ACCEPT => RecordKind::CALL_ACCEPT,
        CallAction::END => RecordKind::CALL_END,
        other => return Err(invalid(format!("unknown call action {other}"))),
    };
    if kind != RecordKind::CALL_INVITE {
        check_target(c.call)?;
    }
    if c.data.len() > MAX_CALL_DATA {
        return Err(invalid(format!("call data is at most {MAX_CALL_DATA} bytes")));
    }
    let job = CallJob { to: ctx.to, actor: ctx.who.actor.clone(), room: c.room, kind, call: c.call, data: c.data };
    Ok(Admitted::Work(Work::Room(Box::new(job))))
}

/// A call signalling delta, on the room's shard.
struct CallJob {
    to: ReplyTo,
    actor: Actor,
    room: RoomId,
    kind: RecordKind,
    call: Seq,
    data: String,
}

impl RoomWork for CallJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn room(&self) -> RoomId {
        self.room
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn Store, _settings: &Settings) -> Vec<Effect> {
        let actor = (self.actor.user_id, &*self.actor.name);
        match store.signal(self.room, actor, self.kind, self.call, &self.data, now_ms()) {
            Ok(delta) => crate::work::appended(self.to, delta),
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// Admits VIEW: a read on the shared queue.
pub fn view(ctx: &mut Ctx<'_>, v: View) -> Result<Admitted, ErrorBody> {
    let limit = page_size(v.limit);
    let job = ViewJob { to: ctx.to, actor: ctx.who.actor.clone(), room: v.room, before: v.before, limit };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// An action on a message, on its room's shard.
struct ActJob {
    to: ReplyTo,
    action: NewAction,
}

impl RoomWork for ActJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn room(&self) -> RoomId {
        self.action.room
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn Store, settings: &Settings) -> Vec<Effect> {
        let action = NewAction { now_ms: now_ms(), ..self.action };
        match store.act(&action) {
            Ok(ActionOutcome::Applied(delta)) => {
                if action.action == MessageAction::Delete {
                    // A deleted file message took its file record with it; its content may now
                    // be unreferenced.
                    super::files::collect(store, settings);
                }
                // A reply is a message: it notifies as a post does.
                if let (Some(notifier), MessageAction::Reply { .. }) = (&settings.notifier, &action.action) {
                    super::messages::queue_notifications(store, notifier, &delta);
                }
                crate::work::appended(self.to, delta)
            }
            Ok(ActionOutcome::Unchanged { seq, ts_ms }) => {
                let posted = Posted { room: action.room, seq, ts_ms, duplicate: true };
                vec![reply(self.to, ServerFrame::Posted(posted))]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// VIEW: a page of messages in their current state.
struct ViewJob {
    to: ReplyTo,
    actor: Actor,
    room: RoomId,
    before: Seq,
    limit: u32,
}

impl SharedWork for ViewJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        match store.messages_before(self.room, self.actor.user_id, self.before, self.limit) {
            Ok(messages) => {
                vec![reply(self.to, ServerFrame::MessagePage(message_page(self.room, messages, self.limit)))]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// A `MESSAGE_PAGE` of messages read newest first, at most `limit` of them: cut to the text
/// budget (always keeping one message) so that it fits a frame, with `next_before` set when the
/// read was full or cut, so older messages may follow.
pub fn message_page(room: RoomId, mut messages: Vec<MessageRecord>, limit: u32) -> MessagePage {
    let full = messages.len() as u64 >= u64::from(limit);
    let mut budget = 0usize;
    let cut = messages.iter().position(|m| {
        budget += m.text.as_deref().map_or(0, str::len) + m.author.len() + m.reactions.len() * 48;
        budget > PAGE_TEXT_BUDGET
    });
    if let Some(cut) = cut {
        messages.truncate(cut.max(1));
    }
    let next_before = if full || cut.is_some() { messages.last().map(|m| m.seq) } else { None };
    MessagePage { room, messages: messages.into_iter().map(view_of).collect(), next_before }
}

fn view_of(m: MessageRecord) -> MessageView {
    MessageView {
        seq: m.seq,
        author_id: m.author_id,
        author: m.author,
        ts_ms: m.ts_ms,
        text: m.text,
        edited_ms: m.edited_ms,
        deleted: m.deleted,
        reply_to: m.reply_to,
        pinned: m.pinned,
        reactions: m.reactions.into_iter().map(|(emoji, count, mine)| ReactionCount { emoji, count, mine }).collect(),
    }
}
