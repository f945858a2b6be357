//! Receipts and what is new: RECEIPT (delivered and read positions per room), UNREAD (the rooms
//! with unread messages or mentions, counted by the server), NOTIFICATIONS (the user's recent
//! mentions, what an offline member finds at the next login).
//!
//! All run on the shared queue: a cursor is the user's, not part of any room's log. A read on one
//! device reaches the user's other connections at once (`READ_STATE_CHANGED`), so every device
//! clears the same count.

use super::{page_size, Admitted, Ctx};
use crate::work::{refuse, reply, store_error, Actor, Effect, EncodeReply, ReplyTo, Settings, SharedWork, Work};
use chime_protocol::{
    Notification, NotificationList, Notifications, ReadState, Receipt, ServerFrame, Unread, UnreadList,
};
use chime_storage::{RoomId, SharedStore, UnreadRecord};

/// Admits RECEIPT.
pub fn receipt(ctx: &mut Ctx<'_>, r: Receipt) -> Result<Admitted, chime_protocol::ErrorBody> {
    Ok(Admitted::Work(Work::Shared(Box::new(ReceiptJob { to: ctx.to, actor: ctx.who.actor.clone(), r }))))
}

/// Admits UNREAD.
pub fn unread(ctx: &mut Ctx<'_>, u: Unread) -> Result<Admitted, chime_protocol::ErrorBody> {
    let job = UnreadJob { to: ctx.to, actor: ctx.who.actor.clone(), after: u.after_room, limit: page_size(u.limit) };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits NOTIFICATIONS.
pub fn notifications(ctx: &mut Ctx<'_>, n: Notifications) -> Result<Admitted, chime_protocol::ErrorBody> {
    let job = NotificationsJob { to: ctx.to, actor: ctx.who.actor.clone(), limit: page_size(n.limit) };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

fn read_state(u: &UnreadRecord) -> ReadState {
    ReadState {
        room: u.room,
        head: u.head,
        delivered: u.delivered,
        read: u.read,
        unread: u.unread,
        mentions: u.mentions,
    }
}

struct ReceiptJob {
    to: ReplyTo,
    actor: Actor,
    r: Receipt,
}

impl SharedWork for ReceiptJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, settings: &Settings) -> Vec<Effect> {
        let user = self.actor.user_id;
        match store.mark_read(self.r.room, user, self.r.delivered, self.r.read) {
            Ok(state) => {
                // Read on any device: a push still waiting for what is now read is not sent.
                if let Some(notifier) = &settings.notifier {
                    notifier.read(user, state.room, state.read);
                }
                let state = read_state(&state);
                vec![
                    reply(self.to, ServerFrame::ReadState(state)),
                    Effect::PushToUser {
                        user,
                        except: Some(self.to.conn),
                        frame: ServerFrame::ReadStateChanged(state).reply(0),
                    },
                ]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

struct UnreadJob {
    to: ReplyTo,
    actor: Actor,
    after: RoomId,
    limit: u32,
}

impl SharedWork for UnreadJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        match store.unread(self.actor.user_id, self.after, self.limit) {
            Ok(rooms) => {
                let next_after =
                    if rooms.len() as u64 >= u64::from(self.limit) { rooms.last().map(|r| r.room) } else { None };
                let rooms = rooms.iter().map(read_state).collect();
                vec![reply(self.to, ServerFrame::UnreadList(UnreadList { rooms, next_after }))]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

struct NotificationsJob {
    to: ReplyTo,
    actor: Actor,
    limit: u32,
}

impl SharedWork for NotificationsJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        // At most 50: fifty of the longest messages still fit one frame.
        let limit = self.limit.min(50);
        match store.mentions(self.actor.user_id, limit) {
            Ok(list) => {
                let notifications = list
                    .into_iter()
                    .map(|m| Notification {
                        room: m.room,
                        seq: m.seq,
                        author: m.author,
                        ts_ms: m.ts_ms,
                        text: m.text,
                        read: m.read,
                    })
                    .collect();
                vec![reply(self.to, ServerFrame::NotificationList(NotificationList { notifications }))]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// The job the core queues after a login: the counts a client shows on login, pushed after AUTHED
/// (`UNREAD_AT_LOGIN`, the first page of what `UNREAD` answers) when something is unread, saving
/// a round trip at every start. A job of its own, so a user in thousands of rooms is logged in
/// (AUTHED) as fast as anyone and the counts follow; a failed read costs only the push.
pub fn unread_at_login(conn: crate::work::ConnRef, user: chime_storage::UserId) -> Work {
    Work::Shared(Box::new(UnreadAtLoginJob { to: ReplyTo { conn, request_id: 0 }, user }))
}

struct UnreadAtLoginJob {
    to: ReplyTo,
    user: chime_storage::UserId,
}

impl SharedWork for UnreadAtLoginJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        None
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let limit = crate::limits::DEFAULT_PAGE;
        match store.unread(self.user, RoomId(0), limit) {
            Ok(rooms) if !rooms.is_empty() => {
                let next_after =
                    if rooms.len() as u64 >= u64::from(limit) { rooms.last().map(|r| r.room) } else { None };
                let rooms = rooms.iter().map(read_state).collect();
                vec![reply(self.to, ServerFrame::UnreadAtLogin(UnreadList { rooms, next_after }))]
            }
            Ok(_) => Vec::new(),
            Err(e) => {
                log::debug!("unread counts at login of user {}: {e}", self.user);
                Vec::new()
            }
        }
    }
}
