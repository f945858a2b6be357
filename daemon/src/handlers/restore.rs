//! RESTORE: a room's whole log in pages, oldest first or newest first, for a device that holds
//! none of it.
//!
//! Each page is one read on the shared queue. Seqs have no gaps, so a page's seq range follows
//! from its cursor and size alone and the store reads exactly that range (`deltas_page`), in one
//! or two of the log's partitions, whichever end it starts from. Pages are capped like HISTORY's
//! (at most 1,000 deltas, cut to the text budget so they fit a frame), and each user may read at
//! most `restore_pages_per_sec` pages a second with bursts of `restore_burst`: a refusal is
//! `RATE_LIMITED` and says in its message how long to wait (`ErrorBody::rate_limited`), so a
//! client restoring a huge room slows to the rate instead of hammering the server.

use super::{invalid, page_size, sync::cut_to_budget, Admitted, Ctx};
use crate::work::{refuse, reply, store_error, wire_delta, Actor, Effect, ReplyTo, Settings, SharedWork, Work};
use chime_protocol::{ErrorBody, ErrorCode, Restore, RestoreOrder, RestorePage, ServerFrame};
use chime_storage::{Order, RoomId, Seq, SharedStore};

/// Admits RESTORE: a known order, within the user's page rate.
pub fn restore(ctx: &mut Ctx<'_>, r: Restore) -> Result<Admitted, ErrorBody> {
    let order = match r.order {
        RestoreOrder::OLDEST_FIRST => Order::OldestFirst,
        RestoreOrder::NEWEST_FIRST => Order::NewestFirst,
        other => return Err(invalid(format!("unknown restore order {other}"))),
    };
    if let Err(wait) = ctx.limiters.restores_per_user.take(ctx.who.actor.user_id, ctx.now) {
        let rate = ctx.config.restore_pages_per_sec;
        // Rounded up: retrying at the stated time must succeed.
        let wait_ms = u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
        return Err(ErrorBody::rate_limited(format!("at most {rate} RESTORE pages per second"), wait_ms));
    }
    let job = RestoreJob {
        to: ctx.to,
        actor: ctx.who.actor.clone(),
        room: r.room,
        order,
        cursor: r.cursor,
        limit: page_size(r.limit),
    };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// One page of a restore.
struct RestoreJob {
    to: ReplyTo,
    actor: Actor,
    room: RoomId,
    order: Order,
    /// As the client sent it (0: from its end of the log).
    cursor: Seq,
    limit: u32,
}

impl SharedWork for RestoreJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let RestoreJob { to, actor, room, order, cursor, limit } = *self;
        // One read gives both the membership and the head; a room that does not exist is refused
        // like one the user is not in.
        let head = match store.room_details(room, actor.user_id) {
            Ok(Some(d)) if d.role.is_some() => d.room.last_seq,
            Ok(_) => {
                return vec![refuse(to, ErrorBody::new(ErrorCode::NOT_MEMBER, format!("not a member of room {room}")))]
            }
            Err(e) => return vec![refuse(to, store_error(&e))],
        };
        // The store's cursor: newest first from 0 means from the head down.
        let (cursor, wire_order) = match order {
            Order::OldestFirst => (cursor, RestoreOrder::OLDEST_FIRST),
            Order::NewestFirst if cursor == Seq::ZERO => (head.next(), RestoreOrder::NEWEST_FIRST),
            Order::NewestFirst => (cursor, RestoreOrder::NEWEST_FIRST),
        };
        // Such a cursor cannot come from this server's pages (see HISTORY's CURSOR_AHEAD).
        let farthest = match order {
            Order::OldestFirst => head,
            Order::NewestFirst => head.next(),
        };
        if cursor > farthest {
            let message = format!("cursor {cursor} is past room {room}'s head {head}");
            return vec![refuse(to, ErrorBody::new(ErrorCode::CURSOR_AHEAD, message))];
        }
        let mut deltas = match store.deltas_page(room, order, cursor, limit) {
            Ok(deltas) => deltas,
            Err(e) => return vec![refuse(to, store_error(&e))],
        };
        cut_to_budget(&mut deltas);
        // Deltas committed since the head was read may be in the page: the head is at least its
        // newest.
        let head = deltas.iter().map(|d| d.seq).fold(head, Seq::max);
        let next = match (order, deltas.last()) {
            (Order::OldestFirst, Some(last)) if last.seq < head => Some(last.seq),
            (Order::NewestFirst, Some(last)) if last.seq > Seq(1) => Some(last.seq),
            _ => None,
        };
        let deltas = deltas.into_iter().map(wire_delta).collect();
        vec![reply(to, ServerFrame::RestorePage(RestorePage { room, order: wire_order, head, deltas, next }))]
    }
}
