//! Messages: POST (group-committed) and HISTORY.
//!
//! A post is [`Work::Post`], a plain value: its room's shard worker takes every post waiting in
//! its queue and hands them to [`commit`] together, which writes them in one transaction (one
//! fsync for the batch), answers each POSTED only after that commit, and encodes each room's new
//! deltas once for every recipient ([`Published`]).

use super::{page_size, sync::FetchJob, Admitted, Ctx};
use crate::work::{refuse, reply, store_error, wire_delta, Effect, PostWork, Published, Settings, Work};
use chime_protocol::{Delta, ErrorBody, ErrorCode, History, Post, Posted, ServerFrame};
use chime_storage::{now_ms, NewPost, PostOutcome, RoomId, Store};

/// Admits POST: a text of 1 to 16,384 bytes and an idempotency key of 1 to 64 bytes.
pub fn post(ctx: &mut Ctx<'_>, p: Post) -> Result<Admitted, ErrorBody> {
    super::actions::check_text(&p.text)?;
    super::actions::check_key(&p.idempotency_key)?;
    let post = NewPost {
        room: p.room,
        author_id: ctx.who.actor.user_id,
        author: ctx.who.actor.name.to_string(),
        idempotency_key: p.idempotency_key,
        text: p.text,
        now_ms: 0,
    };
    Ok(Admitted::Work(Work::Post(PostWork { to: ctx.to, post })))
}

/// Admits HISTORY: one page of a room's log after a seq, for members.
pub fn history(ctx: &mut Ctx<'_>, h: History) -> Result<Admitted, ErrorBody> {
    let job = FetchJob::history(ctx.to, ctx.who.actor.clone(), h.room, h.after, page_size(h.limit));
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Commits a batch of posts in one transaction (their times are the commit's) and returns the
/// acks, then the published deltas: acks first, so authors hear back before a thousand recipients
/// are served.
pub fn commit(store: &mut dyn Store, posts: Vec<PostWork>, settings: &Settings) -> Vec<Effect> {
    if posts.is_empty() {
        return Vec::new();
    }
    let now = now_ms();
    let (tos, batch): (Vec<_>, Vec<NewPost>) =
        posts.into_iter().map(|p| (p.to, NewPost { now_ms: now, ..p.post })).unzip();
    let outcomes = match store.append_posts(&batch) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            let error = store_error(&e);
            return tos.into_iter().map(|to| refuse(to, error.clone())).collect();
        }
    };
    let mut effects = Vec::with_capacity(tos.len() + 1);
    let mut by_room: Vec<(RoomId, Vec<Delta>)> = Vec::new();
    for ((to, post), outcome) in tos.into_iter().zip(&batch).zip(outcomes) {
        let answer = match outcome {
            PostOutcome::Inserted(delta) => {
                let posted = Posted { room: delta.room, seq: delta.seq, ts_ms: delta.ts_ms, duplicate: false };
                if let Some(notifier) = &settings.notifier {
                    queue_notifications(store, notifier, &delta);
                }
                match by_room.iter_mut().find(|(r, _)| *r == delta.room) {
                    Some((_, v)) => v.push(wire_delta(delta)),
                    None => by_room.push((delta.room, vec![wire_delta(delta)])),
                }
                reply(to, ServerFrame::Posted(posted))
            }
            PostOutcome::Duplicate { seq, ts_ms } => {
                reply(to, ServerFrame::Posted(Posted { room: post.room, seq, ts_ms, duplicate: true }))
            }
            PostOutcome::NotMember => {
                refuse(to, ErrorBody::new(ErrorCode::NOT_MEMBER, format!("not a member of room {}", post.room)))
            }
            PostOutcome::Forbidden => refuse(
                to,
                ErrorBody::new(
                    ErrorCode::FORBIDDEN,
                    format!("you may not post in room {} (muted, or your role does not allow post)", post.room),
                ),
            ),
        };
        effects.push(answer);
    }
    effects.extend(by_room.iter().filter_map(|(room, deltas)| Published::encode(*room, deltas)).map(Effect::Publish));
    effects
}

/// Queues the push notifications a committed message causes (after its commit: a notification
/// never announces a message that might not exist). A failed look-up costs the notifications, not
/// the post, which is already acknowledged.
pub fn queue_notifications(
    store: &mut dyn chime_storage::SharedStore,
    notifier: &crate::notify::Notifier,
    delta: &chime_storage::DeltaRecord,
) {
    match store.push_targets(delta.room, delta.seq, delta.author_id) {
        Ok(targets) => {
            for t in targets {
                notifier.queue(crate::notify::PushNotification {
                    user: t.user,
                    user_name: t.name,
                    room: delta.room,
                    seq: delta.seq,
                    author: delta.author.clone(),
                    ts_ms: delta.ts_ms,
                    reason: t.reason,
                });
            }
        }
        Err(e) => log::debug!("push targets of {}/{}: {e}", delta.room, delta.seq),
    }
}
