//! Servers (communities) and their channels: CREATE_SERVER, JOIN_SERVER, LEAVE_SERVER,
//! LIST_SERVERS, CREATE_CHANNEL, SET_SERVER_ROLE, DEFINE_SERVER_ROLE, MODERATE_SERVER (invite,
//! ban, unban: a private server is joined by invitation only, a banned user not at all).
//!
//! Everything here runs on the shared queue: a server's membership is one row per member and
//! changes no room's log, and a new channel is a log nobody writes yet. Access to a channel comes
//! from the member's server role (see `chime_storage`'s `room_access`), so joining a server of a
//! million members writes one row and subscribes only the joiner's connections; the hub keeps, per
//! server, the connections of its online members, so a new channel reaches them without walking
//! the member list.

use super::{invalid, page_size, Admitted, Ctx};
use crate::limits::MAX_ROOM_NAME;
use crate::work::{
    refuse, reply, store_error, wire_delta, Actor, Effect, Published, ReplyTo, Settings, SharedWork, Work,
};
use chime_protocol::{
    CreateChannel, CreateServer, DefineServerRole, Empty, ErrorBody, ListServers, ModAction, ModerateServer, RoomKind,
    ServerFrame, ServerInfo, ServerList, ServerRef, SetServerRole,
};
use chime_storage::{now_ms, NewChannel, NewServer, ServerId, ServerRecord, SharedStore};

use super::rooms::room_info;

/// Longest server description, in characters.
const MAX_DESCRIPTION: usize = 1000;
/// The member cap of a new server: the design's million.
pub const DEFAULT_MEMBER_CAP: u64 = 1_000_000;

fn check_name(name: &str, what: &str) -> Result<String, ErrorBody> {
    let name = name.trim().to_string();
    if name.is_empty() || name.chars().count() > MAX_ROOM_NAME {
        return Err(invalid(format!("{what} name must be 1 to {MAX_ROOM_NAME} characters")));
    }
    Ok(name)
}

/// A role list of a channel: plain role names.
fn check_roles(roles: &[String]) -> Result<(), ErrorBody> {
    if roles.len() > 32 || !roles.iter().all(|r| chime_storage::moderation::definable(r) || r == "owner") {
        return Err(invalid("roles are up to 32 names of 1 to 32 of a-z 0-9 - _"));
    }
    Ok(())
}

/// A server as the wire describes it.
pub fn server_info(s: &ServerRecord, channels: Vec<chime_protocol::RoomInfo>) -> ServerInfo {
    ServerInfo {
        server: s.id,
        name: s.name.clone(),
        description: s.description.clone(),
        public: s.public,
        owner: s.owner,
        members: s.members,
        member_cap: s.member_cap,
        role: s.role.clone().unwrap_or_default(),
        channels,
    }
}

/// Admits CREATE_SERVER, within the user's room-creation rate.
pub fn create(ctx: &mut Ctx<'_>, c: CreateServer) -> Result<Admitted, ErrorBody> {
    let name = check_name(&c.name, "server")?;
    if c.description.chars().count() > MAX_DESCRIPTION {
        return Err(invalid(format!("a description is at most {MAX_DESCRIPTION} characters")));
    }
    if !ctx.limiters.creates_per_user.try_take(ctx.who.actor.user_id, ctx.now) {
        return Err(ErrorBody::new(
            chime_protocol::ErrorCode::RATE_LIMITED,
            "too many creations per minute; retry later",
        ));
    }
    let server = NewServer {
        owner: ctx.who.actor.user_id,
        owner_name: ctx.who.actor.name.to_string(),
        name,
        description: c.description,
        public: c.public,
        member_cap: DEFAULT_MEMBER_CAP,
        now_ms: 0,
    };
    Ok(Admitted::Work(Work::Shared(Box::new(CreateServerJob { to: ctx.to, server }))))
}

/// Admits JOIN_SERVER.
pub fn join(ctx: &mut Ctx<'_>, r: ServerRef) -> Result<Admitted, ErrorBody> {
    Ok(Admitted::Work(Work::Shared(Box::new(MembershipJob {
        to: ctx.to,
        actor: ctx.who.actor.clone(),
        server: r.server,
        join: true,
    }))))
}

/// Admits LEAVE_SERVER.
pub fn leave(ctx: &mut Ctx<'_>, r: ServerRef) -> Result<Admitted, ErrorBody> {
    Ok(Admitted::Work(Work::Shared(Box::new(MembershipJob {
        to: ctx.to,
        actor: ctx.who.actor.clone(),
        server: r.server,
        join: false,
    }))))
}

/// Admits LIST_SERVERS.
pub fn list(ctx: &mut Ctx<'_>, l: ListServers) -> Result<Admitted, ErrorBody> {
    let job = ListJob { to: ctx.to, actor: ctx.who.actor.clone(), after: l.after_server, limit: page_size(l.limit) };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits CREATE_CHANNEL.
pub fn create_channel(ctx: &mut Ctx<'_>, c: CreateChannel) -> Result<Admitted, ErrorBody> {
    let name = check_name(&c.name, "channel")?;
    check_roles(&c.read_roles)?;
    check_roles(&c.post_roles)?;
    let channel = NewChannel {
        server: c.server,
        actor: ctx.who.actor.user_id,
        actor_name: ctx.who.actor.name.to_string(),
        name,
        kind: if c.voice { RoomKind::VOICE } else { RoomKind::CHANNEL },
        read_roles: c.read_roles,
        post_roles: c.post_roles,
        now_ms: 0,
    };
    Ok(Admitted::Work(Work::Shared(Box::new(ChannelJob { to: ctx.to, channel }))))
}

/// Admits SET_SERVER_ROLE and DEFINE_SERVER_ROLE.
pub fn set_role(ctx: &mut Ctx<'_>, s: SetServerRole) -> Result<Admitted, ErrorBody> {
    if s.role.is_empty() || s.role.len() > 32 {
        return Err(invalid("a role name is 1 to 32 bytes"));
    }
    let job =
        RoleJob { to: ctx.to, actor: ctx.who.actor.clone(), server: s.server, what: RoleWhat::Give(s.user, s.role) };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits DEFINE_SERVER_ROLE (the store checks the name and the right to).
pub fn define_role(ctx: &mut Ctx<'_>, d: DefineServerRole) -> Result<Admitted, ErrorBody> {
    let what = RoleWhat::Define(d.name, d.permissions);
    Ok(Admitted::Work(Work::Shared(Box::new(RoleJob {
        to: ctx.to,
        actor: ctx.who.actor.clone(),
        server: d.server,
        what,
    }))))
}

struct CreateServerJob {
    to: ReplyTo,
    server: NewServer,
}

impl SharedWork for CreateServerJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, settings: &Settings) -> Vec<Effect> {
        let server = NewServer { now_ms: now_ms(), ..self.server };
        match store.create_server(&server, settings.max_rooms_per_user) {
            Ok((record, general, delta)) => {
                let mut effects = vec![Effect::JoinedServer {
                    user: server.owner,
                    server: record.id,
                    channels: vec![(general.id, chime_storage::Seq::ZERO)],
                }];
                effects.extend(Published::encode(general.id, &[wire_delta(delta)]).map(Effect::Publish));
                effects.push(reply(
                    self.to,
                    ServerFrame::ServerInfo(Box::new(server_info(&record, vec![room_info(&general)]))),
                ));
                effects
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

struct MembershipJob {
    to: ReplyTo,
    actor: Actor,
    server: ServerId,
    join: bool,
}

impl SharedWork for MembershipJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, settings: &Settings) -> Vec<Effect> {
        let user = self.actor.user_id;
        if !self.join {
            return match store.leave_server(self.server, user) {
                Ok(channels) => vec![
                    Effect::LeftServer { user, server: self.server, channels },
                    reply(self.to, ServerFrame::Done(Empty {})),
                ],
                Err(e) => vec![refuse(self.to, store_error(&e))],
            };
        }
        match store.join_server(self.server, user, now_ms(), settings.max_rooms_per_user) {
            Ok((record, channels, _)) => {
                let heads = channels.iter().map(|r| (r.id, r.last_seq)).collect();
                let infos = channels.iter().map(room_info).collect();
                vec![
                    Effect::JoinedServer { user, server: record.id, channels: heads },
                    reply(self.to, ServerFrame::ServerInfo(Box::new(server_info(&record, infos)))),
                ]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

struct ListJob {
    to: ReplyTo,
    actor: Actor,
    after: ServerId,
    limit: u32,
}

impl SharedWork for ListJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        match store.servers_page(self.actor.user_id, self.after, self.limit) {
            Ok(page) => {
                let next_after =
                    if page.len() as u64 >= u64::from(self.limit) { page.last().map(|s| s.id) } else { None };
                let servers = page.iter().map(|s| server_info(s, Vec::new())).collect();
                vec![reply(self.to, ServerFrame::ServerList(ServerList { servers, next_after }))]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

struct ChannelJob {
    to: ReplyTo,
    channel: NewChannel,
}

impl SharedWork for ChannelJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let c = NewChannel { now_ms: now_ms(), ..self.channel };
        match store.create_channel(&c) {
            Ok((room, delta)) => {
                // Every online member follows a channel all may read; a restricted one reaches
                // its creator now and its other online readers once a worker has checked their
                // roles ([`readers`]).
                let mut effects = if c.read_roles.is_empty() {
                    vec![Effect::ChannelCreated { server: c.server, room: room.id }]
                } else {
                    vec![
                        Effect::Subscribe { user: c.actor, room: room.id, after: Some(chime_storage::Seq::ZERO) },
                        Effect::RestrictedChannelCreated { server: c.server, room: room.id, creator: c.actor },
                    ]
                };
                effects.extend(Published::encode(room.id, &[wire_delta(delta)]).map(Effect::Publish));
                effects.push(reply(self.to, ServerFrame::RoomInfo(room_info(&room))));
                effects
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

enum RoleWhat {
    Give(String, String),
    Define(String, Option<chime_protocol::Permissions>),
}

struct RoleJob {
    to: ReplyTo,
    actor: Actor,
    server: ServerId,
    what: RoleWhat,
}

impl SharedWork for RoleJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, settings: &Settings) -> Vec<Effect> {
        let user = self.actor.user_id;
        let mut effects = Vec::new();
        let result = match &self.what {
            RoleWhat::Give(target, role) => store.set_server_role(self.server, user, target, role).map(|changed| {
                if changed {
                    effects = self.channels_follow_role(store, target, settings);
                }
            }),
            RoleWhat::Define(name, perms) => store.define_server_role(self.server, user, name, *perms),
        };
        match result {
            Ok(()) => {
                effects.push(reply(self.to, ServerFrame::Done(Empty {})));
                effects
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

impl RoleJob {
    /// After `target`'s server role changed: their live connections follow the channels the new
    /// role may read (from the start of each one newly readable) and drop those it may not. The
    /// server's channels are those the actor reads (who may give roles is normally an owner or
    /// admin, who read every channel); both lists are the store's answers to a join by an existing
    /// member, which writes nothing. A failed read leaves the subscriptions to the next login.
    fn channels_follow_role(&self, store: &mut dyn SharedStore, target: &str, settings: &Settings) -> Vec<Effect> {
        let now = now_ms();
        let read = (|| {
            let Some(member) = store.user_by_name(target)? else { return Ok(None) };
            let (_, all, _) = store.join_server(self.server, self.actor.user_id, now, settings.max_rooms_per_user)?;
            let (_, readable, _) = store.join_server(self.server, member.id, now, settings.max_rooms_per_user)?;
            Ok::<_, chime_storage::StoreError>(Some((member.id, all, readable)))
        })();
        let (member, all, readable) = match read {
            Ok(Some(found)) => found,
            Ok(None) => return Vec::new(),
            Err(e) => {
                log::debug!("channels of server {} after a role change: {e}", self.server);
                return Vec::new();
            }
        };
        let readable: Vec<chime_storage::RoomId> = readable.iter().map(|r| r.id).collect();
        let mut effects: Vec<Effect> = all
            .iter()
            .filter(|r| !readable.contains(&r.id))
            .map(|r| Effect::Unsubscribe { user: member, room: r.id })
            .collect();
        effects.extend(readable.into_iter().map(|room| Effect::Subscribe {
            user: member,
            room,
            after: Some(chime_storage::Seq::ZERO),
        }));
        effects
    }
}

/// Admits MODERATE_SERVER: INVITE, BAN or UNBAN of a user named by a plausible user name.
pub fn moderate(ctx: &mut Ctx<'_>, m: ModerateServer) -> Result<Admitted, ErrorBody> {
    let action = match m.action {
        ModAction::INVITE => chime_storage::MemberAction::Invite,
        ModAction::BAN => chime_storage::MemberAction::Ban,
        ModAction::UNBAN => chime_storage::MemberAction::Unban,
        other => return Err(invalid(format!("a server takes INVITE, BAN or UNBAN, not {other}"))),
    };
    let user = m.user.trim().to_string();
    if user.is_empty() || user.chars().count() > crate::limits::MAX_USER_NAME {
        return Err(invalid("no such user name"));
    }
    let job = ModerateServerJob { to: ctx.to, actor: ctx.who.actor.clone(), server: m.server, user, action };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// MODERATE_SERVER on the shared queue: membership of a server is no room's log.
struct ModerateServerJob {
    to: ReplyTo,
    actor: Actor,
    server: ServerId,
    user: String,
    action: chime_storage::MemberAction,
}

impl SharedWork for ModerateServerJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        match store.moderate_server(self.server, self.actor.user_id, &self.user, &self.action, now_ms()) {
            Ok(done) => {
                let mut effects = Vec::new();
                // A banned member's connections stop following the server and its channels now.
                if done.changed && self.action == chime_storage::MemberAction::Ban {
                    effects.push(Effect::LeftServer {
                        user: done.user,
                        server: self.server,
                        channels: done.left_channels,
                    });
                }
                effects.push(reply(self.to, ServerFrame::Done(Empty {})));
                effects
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// The job that finds which of `users` (online followers of a server) may read the restricted
/// channel `room`, and subscribes each who may: the core knows who is online, the store who holds
/// which role. One access check per user, for a rare event (a channel's creation).
pub fn readers(room: chime_storage::RoomId, users: Vec<chime_storage::UserId>) -> Work {
    Work::Shared(Box::new(ReadersJob { room, users }))
}

struct ReadersJob {
    room: chime_storage::RoomId,
    users: Vec<chime_storage::UserId>,
}

impl SharedWork for ReadersJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        None
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let mut effects = Vec::new();
        for user in self.users {
            match store.is_member(self.room, user) {
                Ok(true) => {
                    effects.push(Effect::Subscribe { user, room: self.room, after: Some(chime_storage::Seq::ZERO) })
                }
                Ok(false) => {}
                Err(e) => {
                    // They read it from their next login; nobody waits on this job.
                    log::debug!("readers of channel {}: {e}", self.room);
                    break;
                }
            }
        }
        effects
    }
}
