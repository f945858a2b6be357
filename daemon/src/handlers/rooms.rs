//! Rooms and membership: CREATE_ROOM, JOIN_ROOM, LEAVE_ROOM, LIST_ROOMS, LIST_MEMBERS, GET_ROOM,
//! and OPEN_DIRECT (the direct dialog of two users, made on first use).
//!
//! Joins and leaves append to the room's log, so they run on the room's shard ([`Work::Room`]);
//! creating a room starts a log nobody else can write yet, so it runs on the shared queue. Their
//! effects keep the subscriptions in step with the log: a joiner's connections are subscribed
//! knowing the log up to just before its JOIN (so they catch up on anything the loop published
//! meanwhile), then the JOIN is published; a leaver's LEAVE is published before its connections
//! are unsubscribed, so they see it.

use super::{invalid, page_size, Admitted, Ctx};
use crate::limits::MAX_ROOM_NAME;
use crate::work::{
    refuse, reply, store_error, wire_delta, Actor, Effect, Published, ReplyTo, RoomWork, Settings, SharedWork, Work,
};
use chime_protocol::{
    CreateRoom, DefineRole, ErrorBody, ErrorCode, ListMembers, ListRooms, MemberInfo, MemberList, ModAction, Moderate,
    OpenDirect, Posted, RoomDetails, RoomInfo, RoomKind, RoomList, RoomRef, ServerFrame,
};
use chime_storage::{
    now_ms, MemberAction, ModerationOutcome, NewModeration, RoomId, RoomRecord, Seq, SharedStore, Store, UserId,
};

/// Admits CREATE_ROOM: a name of 1 to 100 characters, a known kind, within the user's rate.
pub fn create(ctx: &mut Ctx<'_>, c: CreateRoom) -> Result<Admitted, ErrorBody> {
    let name = c.name.trim().to_string();
    if name.is_empty() || name.chars().count() > MAX_ROOM_NAME {
        return Err(invalid(format!("room name must be 1 to {MAX_ROOM_NAME} characters")));
    }
    if ![RoomKind::GROUP, RoomKind::PRIVATE, RoomKind::SECRET].contains(&c.kind) {
        return Err(invalid(format!("unknown room kind {}", c.kind)));
    }
    if !ctx.limiters.creates_per_user.try_take(ctx.who.actor.user_id, ctx.now) {
        let per_minute = ctx.config.room_create_per_minute;
        return Err(ErrorBody::new(
            ErrorCode::RATE_LIMITED,
            format!("at most {per_minute} rooms per minute; retry later"),
        ));
    }
    let job = CreateJob { to: ctx.to, actor: ctx.who.actor.clone(), name, kind: c.kind };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits OPEN_DIRECT: another user's name. Like creating a room it starts a log nobody writes
/// yet, so it runs on the shared queue; the store makes sure a pair gets one room however both
/// sides race.
pub fn open_direct(ctx: &mut Ctx<'_>, o: OpenDirect) -> Result<Admitted, ErrorBody> {
    let peer = o.user.trim().to_string();
    if peer.is_empty() || peer.chars().count() > crate::limits::MAX_USER_NAME {
        return Err(invalid("no such user name"));
    }
    if peer == *ctx.who.actor.name {
        return Err(invalid("a direct dialog needs another user"));
    }
    if !ctx.limiters.creates_per_user.try_take(ctx.who.actor.user_id, ctx.now) {
        let per_minute = ctx.config.room_create_per_minute;
        return Err(ErrorBody::new(
            ErrorCode::RATE_LIMITED,
            format!("at most {per_minute} new rooms per minute; retry later"),
        ));
    }
    Ok(Admitted::Work(Work::Shared(Box::new(DirectJob { to: ctx.to, actor: ctx.who.actor.clone(), peer }))))
}

/// OPEN_DIRECT: finds or makes the dialog; a new one subscribes both users' connections.
struct DirectJob {
    to: ReplyTo,
    actor: Actor,
    peer: String,
}

impl SharedWork for DirectJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, settings: &Settings) -> Vec<Effect> {
        let (user, name) = (self.actor.user_id, &self.actor.name);
        match store.open_direct(user, name, &self.peer, now_ms(), settings.max_rooms_per_user) {
            Ok(direct) => {
                let mut effects = Vec::new();
                if let Some(delta) = direct.created {
                    for who in [user, direct.peer] {
                        effects.push(Effect::Subscribe { user: who, room: direct.room.id, after: Some(Seq::ZERO) });
                    }
                    effects.extend(Published::encode(direct.room.id, &[wire_delta(delta)]).map(Effect::Publish));
                }
                effects.push(reply(self.to, ServerFrame::RoomInfo(room_info(&direct.room))));
                effects
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// Admits MODERATE: a user name, a known action, a role for SET_ROLE.
pub fn moderate(ctx: &mut Ctx<'_>, m: Moderate) -> Result<Admitted, ErrorBody> {
    let user = m.user.trim().to_string();
    if user.is_empty() || user.chars().count() > crate::limits::MAX_USER_NAME {
        return Err(invalid("no such user name"));
    }
    let action = match m.action {
        ModAction::INVITE => MemberAction::Invite,
        ModAction::KICK => MemberAction::Kick,
        ModAction::BAN => MemberAction::Ban,
        ModAction::UNBAN => MemberAction::Unban,
        ModAction::MUTE => MemberAction::Mute,
        ModAction::UNMUTE => MemberAction::Unmute,
        ModAction::SET_ROLE if !m.role.is_empty() && m.role.len() <= 32 => MemberAction::SetRole(m.role),
        ModAction::SET_ROLE => return Err(invalid("a role name is 1 to 32 bytes")),
        other => return Err(invalid(format!("unknown moderation action {other}"))),
    };
    let m = NewModeration {
        room: m.room,
        actor: ctx.who.actor.user_id,
        actor_name: ctx.who.actor.name.to_string(),
        target: user,
        action,
        max_rooms: 0,
        now_ms: 0,
    };
    Ok(Admitted::Work(Work::Room(Box::new(ModerateJob { to: ctx.to, m }))))
}

/// Admits DEFINE_ROLE (the store checks the name and the right to).
pub fn define_role(ctx: &mut Ctx<'_>, d: DefineRole) -> Result<Admitted, ErrorBody> {
    let job = DefineRoleJob { to: ctx.to, actor: ctx.who.actor.clone(), d };
    Ok(Admitted::Work(Work::Room(Box::new(job))))
}

/// MODERATE on the room's shard: its delta is published; an invited user's connections are
/// subscribed knowing the log up to just before it, a removed user's unsubscribed after it.
struct ModerateJob {
    to: ReplyTo,
    m: NewModeration,
}

impl RoomWork for ModerateJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn room(&self) -> RoomId {
        self.m.room
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn Store, settings: &Settings) -> Vec<Effect> {
        let m = NewModeration { now_ms: now_ms(), max_rooms: settings.max_rooms_per_user, ..self.m };
        match store.moderate(&m) {
            Ok(ModerationOutcome::Applied { delta, user, added, removed }) => {
                let posted = Posted { room: m.room, seq: delta.seq, ts_ms: delta.ts_ms, duplicate: false };
                let mut effects = Vec::new();
                if added {
                    effects.push(Effect::Subscribe { user, room: m.room, after: Some(delta.seq.prev()) });
                }
                effects.extend(Published::encode(m.room, &[wire_delta(delta)]).map(Effect::Publish));
                if removed {
                    effects.push(Effect::Unsubscribe { user, room: m.room });
                }
                effects.push(reply(self.to, ServerFrame::Posted(posted)));
                effects
            }
            Ok(ModerationOutcome::Unchanged { head }) => {
                let posted = Posted { room: m.room, seq: head, ts_ms: m.now_ms, duplicate: true };
                vec![reply(self.to, ServerFrame::Posted(posted))]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// DEFINE_ROLE on the room's shard.
struct DefineRoleJob {
    to: ReplyTo,
    actor: Actor,
    d: DefineRole,
}

impl RoomWork for DefineRoleJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn room(&self) -> RoomId {
        self.d.room
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn Store, _settings: &Settings) -> Vec<Effect> {
        let (d, actor) = (&self.d, &self.actor);
        match store.define_role(d.room, actor.user_id, &actor.name, &d.name, d.permissions, now_ms()) {
            Ok(delta) => {
                let posted = Posted { room: d.room, seq: delta.seq, ts_ms: delta.ts_ms, duplicate: false };
                let mut effects: Vec<Effect> =
                    Published::encode(d.room, &[wire_delta(delta)]).map(Effect::Publish).into_iter().collect();
                effects.push(reply(self.to, ServerFrame::Posted(posted)));
                effects
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// Admits JOIN_ROOM.
pub fn join(ctx: &mut Ctx<'_>, r: RoomRef) -> Result<Admitted, ErrorBody> {
    Ok(Admitted::Work(Work::Room(Box::new(JoinJob { to: ctx.to, actor: ctx.who.actor.clone(), room: r.room }))))
}

/// Admits LEAVE_ROOM.
pub fn leave(ctx: &mut Ctx<'_>, r: RoomRef) -> Result<Admitted, ErrorBody> {
    Ok(Admitted::Work(Work::Room(Box::new(LeaveJob { to: ctx.to, actor: ctx.who.actor.clone(), room: r.room }))))
}

/// Admits LIST_ROOMS.
pub fn list(ctx: &mut Ctx<'_>, l: ListRooms) -> Result<Admitted, ErrorBody> {
    let job = ListRoomsJob { to: ctx.to, user: ctx.who.actor.user_id, after: l.after_room, limit: page_size(l.limit) };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits LIST_MEMBERS.
pub fn members(ctx: &mut Ctx<'_>, m: ListMembers) -> Result<Admitted, ErrorBody> {
    let job = MembersJob {
        to: ctx.to,
        user: ctx.who.actor.user_id,
        room: m.room,
        after: m.after_user,
        limit: page_size(m.limit),
    };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits GET_ROOM: one read on the shared queue.
pub fn get(ctx: &mut Ctx<'_>, r: RoomRef) -> Result<Admitted, ErrorBody> {
    let job = GetRoomJob { to: ctx.to, user: ctx.who.actor.user_id, room: r.room };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// GET_ROOM: the room, its member count and the asker's role. A room that does not exist is
/// NOT_FOUND; one the user is not a member of is NOT_MEMBER (its name is not the stranger's to
/// read).
struct GetRoomJob {
    to: ReplyTo,
    user: UserId,
    room: RoomId,
}

impl SharedWork for GetRoomJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let answer = match store.room_details(self.room, self.user) {
            Ok(None) => Err(ErrorBody::new(ErrorCode::NOT_FOUND, format!("no room {}", self.room))),
            Ok(Some(d)) => match d.role {
                None => Err(ErrorBody::new(ErrorCode::NOT_MEMBER, format!("not a member of room {}", self.room))),
                Some(role) => Ok(RoomDetails { info: room_info(&d.room), members: d.members, role }),
            },
            Err(e) => Err(store_error(&e)),
        };
        vec![match answer {
            Ok(details) => reply(self.to, ServerFrame::RoomDetails(details)),
            Err(error) => refuse(self.to, error),
        }]
    }
}

/// A room as ROOM_INFO and ROOM_LIST describe it.
pub fn room_info(r: &RoomRecord) -> RoomInfo {
    RoomInfo { room: r.id, name: r.name.clone(), kind: r.kind, head_seq: r.last_seq }
}

/// CREATE_ROOM.
struct CreateJob {
    to: ReplyTo,
    actor: Actor,
    name: String,
    kind: RoomKind,
}

impl SharedWork for CreateJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, settings: &Settings) -> Vec<Effect> {
        let (user, name) = (self.actor.user_id, &self.actor.name);
        match store.create_room(&self.name, self.kind, user, name, now_ms(), settings.max_rooms_per_user) {
            Ok((room, delta)) => {
                let mut effects = vec![Effect::Subscribe { user, room: room.id, after: Some(Seq::ZERO) }];
                effects.extend(Published::encode(room.id, &[wire_delta(delta)]).map(Effect::Publish));
                effects.push(reply(self.to, ServerFrame::RoomInfo(room_info(&room))));
                effects
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// JOIN_ROOM, on the room's shard.
struct JoinJob {
    to: ReplyTo,
    actor: Actor,
    room: RoomId,
}

impl RoomWork for JoinJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn room(&self) -> RoomId {
        self.room
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn Store, settings: &Settings) -> Vec<Effect> {
        let (to, room, user) = (self.to, self.room, self.actor.user_id);
        let joined = match store.join_room(room, user, &self.actor.name, now_ms(), settings.max_rooms_per_user) {
            Ok(joined) => joined,
            Err(e) => return vec![refuse(to, store_error(&e))],
        };
        let record = match store.room(room) {
            Ok(Some(record)) => record,
            Ok(None) => return vec![refuse(to, ErrorBody::new(ErrorCode::NOT_FOUND, "no such room"))],
            Err(e) => return vec![refuse(to, store_error(&e))],
        };
        let mut effects = Vec::new();
        match joined {
            // The joiner's view of the log ends just before its JOIN.
            Some(delta) => {
                effects.push(Effect::Subscribe { user, room, after: Some(delta.seq.prev()) });
                effects.extend(Published::encode(room, &[wire_delta(delta)]).map(Effect::Publish));
            }
            // A member already: nothing new to catch up on.
            None => effects.push(Effect::Subscribe { user, room, after: None }),
        }
        effects.push(reply(to, ServerFrame::RoomInfo(room_info(&record))));
        effects
    }
}

/// LEAVE_ROOM, on the room's shard.
struct LeaveJob {
    to: ReplyTo,
    actor: Actor,
    room: RoomId,
}

impl RoomWork for LeaveJob {
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
        let (to, room, user) = (self.to, self.room, self.actor.user_id);
        match store.leave_room(room, user, &self.actor.name, now_ms()) {
            Ok(delta) => {
                let mut effects: Vec<Effect> =
                    Published::encode(room, &[wire_delta(delta)]).map(Effect::Publish).into_iter().collect();
                effects.push(Effect::Unsubscribe { user, room });
                effects.push(reply(to, ServerFrame::Done(Default::default())));
                effects
            }
            Err(e) => vec![refuse(to, store_error(&e))],
        }
    }
}

/// LIST_ROOMS: one page, by id.
struct ListRoomsJob {
    to: ReplyTo,
    user: UserId,
    after: RoomId,
    limit: u32,
}

impl SharedWork for ListRoomsJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        match store.rooms_page(self.user, self.after, self.limit.saturating_add(1)) {
            Ok(rooms) => {
                let mut page: Vec<RoomInfo> = rooms.iter().map(room_info).collect();
                let more = page.len() > self.limit as usize;
                page.truncate(self.limit as usize);
                let next_after = if more { page.last().map(|r| r.room) } else { None };
                vec![reply(self.to, ServerFrame::RoomList(RoomList { rooms: page, next_after }))]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// LIST_MEMBERS: one page, by user id, for members only.
struct MembersJob {
    to: ReplyTo,
    user: UserId,
    room: RoomId,
    after: UserId,
    limit: u32,
}

impl SharedWork for MembersJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let (to, room, limit) = (self.to, self.room, self.limit);
        match store.is_member(room, self.user) {
            Ok(true) => {}
            Ok(false) => {
                return vec![refuse(to, ErrorBody::new(ErrorCode::NOT_MEMBER, format!("not a member of room {room}")))]
            }
            Err(e) => return vec![refuse(to, store_error(&e))],
        }
        match store.members(room, self.after, limit.saturating_add(1)) {
            Ok(mut members) => {
                let more = members.len() > limit as usize;
                members.truncate(limit as usize);
                let next_after = if more { members.last().map(|m| m.user_id) } else { None };
                let members = members
                    .into_iter()
                    .map(|m| MemberInfo { user_id: m.user_id, user: m.name, role: m.role })
                    .collect();
                vec![reply(to, ServerFrame::MemberList(MemberList { room, members, next_after }))]
            }
            Err(e) => vec![refuse(to, store_error(&e))],
        }
    }
}
