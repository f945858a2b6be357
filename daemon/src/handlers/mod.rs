//! One module per family of requests; each request kind lives in one place.
//!
//! A handler has two halves. `admit` runs on the event loop: it validates the request and either
//! refuses it with a typed error or builds the job that will carry it out (or, for what needs no
//! store, answers at once). The job's `run` runs on a worker against the store and returns
//! [`Effect`](crate::work::Effect)s for the loop. Adding a request kind is: a body type in the
//! protocol, a handler here (plus its arm in [`admit`]), a store method, tests. The event loop
//! (`server`) and the core (`core`) do not change.
//!
//! - [`accounts`]: register, log in, resume, log out, sessions, profiles, settings.
//! - [`rooms`]: create, join, leave, list rooms and members.
//! - [`messages`]: post (group-committed) and history.
//! - [`servers`]: servers (communities), their channels and server roles.
//! - [`presence`]: WATCH_PRESENCE (the durable last seen read on a worker, the watch kept by the
//!   core).
//! - [`receipts`]: read receipts, unread counts, mentions (notifications).
//! - [`actions`]: edit, delete, react, reply, pin, and messages in their current state (view).
//! - [`search`]: messages that match a query, in their current state.
//! - [`restore`]: a room's whole log in pages, from either end, rate-limited per user.
//! - [`sync`]: SYNC and the page reads behind it and behind catch-ups.
//! - [`files`]: uploads, downloads and forwards (file threads for the bytes; the core keeps each
//!   connection's open uploads and download windows).

pub mod accounts;
pub mod actions;
pub mod files;
pub mod messages;
pub mod presence;
pub mod receipts;
pub mod restore;
pub mod rooms;
pub mod search;
pub mod servers;
pub mod sync;

use crate::config::Config;
use crate::ratelimit::KeyedLimiter;
use crate::sync::{Action, SyncState};
use crate::work::{Actor, ReplyTo, Work};
use chime_protocol::{ClientFrame, ErrorBody, ErrorCode, ServerFrame};
use chime_storage::{SessionId, UserId};
use std::net::IpAddr;
use std::time::Instant;

/// The logged-in user of a connection, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Who {
    /// The user and name jobs run as.
    pub actor: Actor,
    /// The session (device) the connection logged in with.
    pub session: SessionId,
}

/// Rate limits that handlers apply on the loop.
#[derive(Debug)]
pub struct Limiters {
    /// Password logins and registrations, server-wide.
    pub logins: crate::ratelimit::TokenBucket,
    /// Password logins per address.
    pub logins_per_ip: KeyedLimiter<IpAddr>,
    /// RESUME attempts per address: each is a token guess and a database write.
    pub resumes_per_ip: KeyedLimiter<IpAddr>,
    /// Room creations per user.
    pub creates_per_user: KeyedLimiter<UserId>,
    /// RESTORE pages per user.
    pub restores_per_user: KeyedLimiter<UserId>,
}

impl Limiters {
    /// The limits of `config`.
    pub fn new(config: &Config, now: Instant) -> Limiters {
        let per_ip_logins = config.login_rate.div_ceil(5).max(1);
        Limiters {
            logins: crate::ratelimit::TokenBucket::new(config.login_rate, config.login_rate, now),
            logins_per_ip: KeyedLimiter::new(per_ip_logins, per_ip_logins, 100_000),
            resumes_per_ip: KeyedLimiter::new(config.resume_rate_per_ip, config.resume_rate_per_ip, 100_000),
            creates_per_user: KeyedLimiter::per_minute(
                config.room_create_per_minute,
                config.room_create_per_minute,
                100_000,
            ),
            restores_per_user: KeyedLimiter::new(config.restore_pages_per_sec, config.restore_burst, 100_000),
        }
    }
}

/// What a handler may look at and change while admitting a request.
pub struct Ctx<'a> {
    /// Who gets the answer.
    pub to: ReplyTo,
    /// The logged-in user.
    pub who: &'a Who,
    /// The connection's SYNC state, created on first use.
    pub sync: &'a mut Option<Box<SyncState>>,
    /// The sessions of the user that have a live connection (for LIST_SESSIONS).
    pub online: &'a dyn Fn(UserId) -> Vec<SessionId>,
    /// Rate limits.
    pub limiters: &'a mut Limiters,
    /// The configuration.
    pub config: &'a Config,
    /// The loop's clock.
    pub now: Instant,
}

/// What admitting a request led to.
#[derive(Debug)]
pub enum Admitted {
    /// A job for the workers.
    Work(Work),
    /// Actions of the connection's SYNC state (a SYNC started).
    Sync(Vec<Action>),
    /// The answer, known on the loop (nothing to read or write).
    Reply(ServerFrame),
    /// Typing or presence: the core carries it out with the hub and answers.
    Ephemeral(Ephemeral),
}

/// What the core does for an ephemeral request.
#[derive(Debug)]
pub enum Ephemeral {
    /// TYPING in a room.
    Typing(chime_storage::RoomId),
    /// SET_PRESENCE.
    SetPresence(chime_protocol::PresenceStatus),
}

/// A request refused on the loop.
pub fn invalid(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::INVALID_ARGUMENT, message)
}

/// Admits a request of a logged-in connection: the table from frame type to handler.
/// Handshake, heartbeat and login frames are the core's (they change the connection's state).
pub fn admit(ctx: &mut Ctx<'_>, frame: ClientFrame) -> Result<Admitted, ErrorBody> {
    match frame {
        ClientFrame::Logout(_) => accounts::logout(ctx),
        ClientFrame::ListSessions(l) => accounts::list_sessions(ctx, l),
        ClientFrame::RevokeSessions(r) => accounts::revoke_sessions(ctx, r),
        ClientFrame::Whoami(_) => accounts::whoami(ctx),
        ClientFrame::GetProfile(g) => accounts::get_profile(ctx, g),
        ClientFrame::UpdateProfile(u) => accounts::update_profile(ctx, u),
        ClientFrame::GetSettings(g) => accounts::get_settings(ctx, g),
        ClientFrame::SetSetting(s) => accounts::set_setting(ctx, s),
        ClientFrame::CreateRoom(c) => rooms::create(ctx, c),
        ClientFrame::JoinRoom(r) => rooms::join(ctx, r),
        ClientFrame::LeaveRoom(r) => rooms::leave(ctx, r),
        ClientFrame::ListRooms(l) => rooms::list(ctx, l),
        ClientFrame::ListMembers(m) => rooms::members(ctx, m),
        ClientFrame::GetRoom(r) => rooms::get(ctx, r),
        ClientFrame::OpenDirect(o) => rooms::open_direct(ctx, o),
        ClientFrame::Moderate(m) => rooms::moderate(ctx, m),
        ClientFrame::Receipt(r) => receipts::receipt(ctx, r),
        ClientFrame::Typing(t) => Ok(Admitted::Ephemeral(Ephemeral::Typing(t.room))),
        ClientFrame::SetPresence(p) => match p.status {
            chime_protocol::PresenceStatus::ONLINE | chime_protocol::PresenceStatus::AWAY => {
                Ok(Admitted::Ephemeral(Ephemeral::SetPresence(p.status)))
            }
            other => Err(invalid(format!("presence is ONLINE or AWAY, not {other}"))),
        },
        ClientFrame::WatchPresence(w) => presence::watch(ctx, w),
        ClientFrame::Unread(u) => receipts::unread(ctx, u),
        ClientFrame::Notifications(n) => receipts::notifications(ctx, n),
        ClientFrame::CreateServer(c) => servers::create(ctx, c),
        ClientFrame::JoinServer(r) => servers::join(ctx, r),
        ClientFrame::LeaveServer(r) => servers::leave(ctx, r),
        ClientFrame::ListServers(l) => servers::list(ctx, l),
        ClientFrame::CreateChannel(c) => servers::create_channel(ctx, c),
        ClientFrame::SetServerRole(s) => servers::set_role(ctx, s),
        ClientFrame::DefineServerRole(d) => servers::define_role(ctx, d),
        ClientFrame::DefineRole(d) => rooms::define_role(ctx, d),
        ClientFrame::Post(p) => messages::post(ctx, p),
        ClientFrame::History(h) => messages::history(ctx, h),
        ClientFrame::Sync(s) => sync::start(ctx, s),
        ClientFrame::Edit(e) => actions::edit(ctx, e),
        ClientFrame::Delete(d) => actions::delete(ctx, d),
        ClientFrame::React(r) => actions::react(ctx, r),
        ClientFrame::Reply(r) => actions::reply_to(ctx, r),
        ClientFrame::Pin(p) => actions::pin(ctx, p),
        ClientFrame::View(v) => actions::view(ctx, v),
        ClientFrame::Call(c) => actions::call(ctx, c),
        ClientFrame::Search(s) => search::search(ctx, s),
        ClientFrame::Restore(r) => restore::restore(ctx, r),
        ClientFrame::ModerateServer(m) => servers::moderate(ctx, m),
        ClientFrame::UploadBegin(b) => files::begin(ctx, b),
        ClientFrame::UploadResume(r) => files::resume(ctx, r),
        ClientFrame::Forward(f) => files::forward(ctx, f),
        // The core's: they need the connection's open uploads and downloads.
        ClientFrame::UploadChunk(_)
        | ClientFrame::UploadFinish(_)
        | ClientFrame::Download(_)
        | ClientFrame::DownloadAck(_)
        | ClientFrame::Hello(_)
        | ClientFrame::Ping(_)
        | ClientFrame::Pong(_)
        | ClientFrame::Register(_)
        | ClientFrame::Login(_)
        | ClientFrame::Resume(_) => {
            Err(ErrorBody::new(ErrorCode::INTERNAL, "frame handled before admission reached a handler"))
        }
    }
}

/// A page size asked for: 0 means the default, anything over the maximum is the maximum.
pub fn page_size(asked: u32) -> u32 {
    if asked == 0 {
        crate::limits::DEFAULT_PAGE
    } else {
        asked.min(crate::limits::MAX_PAGE)
    }
}
