//! Accounts and sessions: REGISTER, LOGIN, RESUME, LOGOUT, LIST_SESSIONS, REVOKE_SESSIONS, WHOAMI,
//! and the record of when sessions were last used.
//!
//! Password hashing (argon2id, slow on purpose) runs on the auth workers, never on the loop or in
//! front of anyone's post. A successful login yields [`Effect::LoggedIn`] with the user's rooms as
//! read then; the core subscribes the connection and catches it up on anything published since.
//! Revoking sessions yields [`Effect::EndSessions`]: every connection of them ends at once.

use super::{invalid, page_size, Admitted, Ctx, Limiters};
use crate::auth;
use crate::limits::{MAX_PASSWORD, MAX_USER_AGENT};
use crate::work::{refuse, reply, store_error, AuthWork, Effect, ReplyTo, Settings, SharedWork, Work};
use chime_protocol::{
    Authed, Credentials, ErrorBody, ErrorCode, Identity, ListSessions, Resume, RevokeSessions, ServerFrame,
    SessionInfo, SessionList, SessionsRevoked,
};
use chime_storage::{now_ms, NewSession, SessionId, SessionRecord, SharedStore, StoreError, UserId};
use std::net::IpAddr;
use std::time::Instant;

/// Admits REGISTER (`register`) or LOGIN: rate limits (server-wide and per address), then the
/// name and password rules. A wrong password takes the same time as a right one (the hash is
/// checked whatever the name), so the answer tells nothing about which users exist.
pub fn password(
    to: ReplyTo,
    peer: IpAddr,
    register: bool,
    c: Credentials,
    limiters: &mut Limiters,
    now: Instant,
) -> Result<Work, ErrorBody> {
    if !limiters.logins_per_ip.try_take(peer, now) || !limiters.logins.try_take(now) {
        return Err(ErrorBody::new(ErrorCode::RATE_LIMITED, "too many logins; retry in a few seconds"));
    }
    auth::validate_user_name(&c.user).map_err(invalid)?;
    if register {
        auth::validate_password(&c.password).map_err(invalid)?;
    } else if c.password.len() > MAX_PASSWORD {
        return Err(ErrorBody::new(ErrorCode::AUTH_FAILED, "wrong user name or password"));
    }
    let user_agent: String = c.user_agent.chars().take(MAX_USER_AGENT).collect();
    Ok(Work::Auth(Box::new(PasswordJob {
        to,
        register,
        user: c.user,
        password: c.password,
        ip: peer.to_string(),
        user_agent,
    })))
}

/// Admits RESUME: limited per address (each attempt is a guess at a token, and a write).
pub fn resume(to: ReplyTo, peer: IpAddr, r: Resume, limiters: &mut Limiters, now: Instant) -> Result<Work, ErrorBody> {
    if !limiters.resumes_per_ip.try_take(peer, now) {
        return Err(ErrorBody::new(ErrorCode::RATE_LIMITED, "too many resumes; retry in a few seconds"));
    }
    Ok(Work::Shared(Box::new(ResumeJob { to, token: r.token })))
}

/// WHOAMI: answered on the loop from the connection's login.
pub fn whoami(ctx: &mut Ctx<'_>) -> Result<Admitted, ErrorBody> {
    let actor = &ctx.who.actor;
    let identity = Identity { user_id: actor.user_id, user: actor.name.to_string(), session: ctx.who.session };
    Ok(Admitted::Reply(ServerFrame::Identity(identity)))
}

/// Admits LOGOUT: revokes the connection's own session.
pub fn logout(ctx: &mut Ctx<'_>) -> Result<Admitted, ErrorBody> {
    let job = RevokeJob { to: ctx.to, user: ctx.who.actor.user_id, which: Some(ctx.who.session), logout: true };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits REVOKE_SESSIONS: one of the user's sessions, or all of them.
pub fn revoke_sessions(ctx: &mut Ctx<'_>, r: RevokeSessions) -> Result<Admitted, ErrorBody> {
    let job = RevokeJob { to: ctx.to, user: ctx.who.actor.user_id, which: r.session, logout: false };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits LIST_SESSIONS, with the sessions that have a live connection now.
pub fn list_sessions(ctx: &mut Ctx<'_>, l: ListSessions) -> Result<Admitted, ErrorBody> {
    let job = ListSessionsJob {
        to: ctx.to,
        user: ctx.who.actor.user_id,
        current: ctx.who.session,
        online: (ctx.online)(ctx.who.actor.user_id),
        after: l.after_session,
        limit: page_size(l.limit),
    };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// A job recording now as the last use of `sessions` (connections that closed, or long-lived
/// ones). Nobody waits for it.
pub fn touch(sessions: Vec<SessionId>) -> Work {
    Work::Shared(Box::new(TouchJob { sessions }))
}

/// REGISTER or LOGIN, on an auth worker.
struct PasswordJob {
    to: ReplyTo,
    register: bool,
    user: String,
    password: String,
    ip: String,
    user_agent: String,
}

impl AuthWork for PasswordJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(
        self: Box<Self>,
        store: &mut dyn SharedStore,
        hasher: &mut auth::Hasher,
        _settings: &Settings,
    ) -> Vec<Effect> {
        let to = self.to;
        let fail = |code, msg: &str| vec![refuse(to, ErrorBody::new(code, msg))];
        let record = if self.register {
            let hash = match hasher.hash(&self.password) {
                Ok(h) => h,
                Err(e) => {
                    log::error!("hashing a password failed: {e}");
                    return fail(ErrorCode::INTERNAL, "could not hash the password");
                }
            };
            match store.create_user(&self.user, &hash) {
                Ok(u) => u,
                Err(StoreError::Conflict(_)) => return fail(ErrorCode::USER_EXISTS, "that user name is taken"),
                Err(e) => return vec![refuse(to, store_error(&e))],
            }
        } else {
            match store.user_by_name(&self.user) {
                Ok(Some(u)) if hasher.verify(&self.password, &u.password_hash) => u,
                Ok(_) => return fail(ErrorCode::AUTH_FAILED, "wrong user name or password"),
                Err(e) => return vec![refuse(to, store_error(&e))],
            }
        };
        let token = auth::new_session_token();
        let session = NewSession {
            user_id: record.id,
            token_hash: auth::token_hash(&token),
            ip: self.ip,
            user_agent: self.user_agent,
            now_ms: now_ms(),
        };
        match store.create_session(&session) {
            Ok(session) => logged_in(store, to, record.id, record.name, session, Some(token)),
            Err(e) => vec![refuse(to, store_error(&e))],
        }
    }
}

/// RESUME.
struct ResumeJob {
    to: ReplyTo,
    token: String,
}

impl SharedWork for ResumeJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, settings: &Settings) -> Vec<Effect> {
        let hash = auth::token_hash(&self.token);
        match store.session_user(&hash, now_ms(), &settings.session_limits) {
            Ok(Some((user, session))) => logged_in(store, self.to, user.id, user.name, session, None),
            Ok(None) => vec![refuse(
                self.to,
                ErrorBody::new(ErrorCode::AUTH_FAILED, "unknown, revoked or expired session token"),
            )],
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// The effects of a successful login: the session with the user's rooms as read now, then AUTHED
/// (with a new token for a password login).
fn logged_in(
    store: &mut dyn SharedStore,
    to: ReplyTo,
    user: UserId,
    name: String,
    session: SessionRecord,
    token: Option<String>,
) -> Vec<Effect> {
    match store.rooms_of_user(user) {
        Ok(rooms) => vec![
            Effect::LoggedIn {
                to,
                user,
                name: name.clone(),
                session,
                rooms: rooms.iter().map(|r| (r.id, r.last_seq)).collect(),
            },
            reply(to, ServerFrame::Authed(Authed { user_id: user, user: name, token })),
        ],
        Err(e) => vec![refuse(to, store_error(&e))],
    }
}

/// LOGOUT (`logout`) or REVOKE_SESSIONS.
struct RevokeJob {
    to: ReplyTo,
    user: UserId,
    which: Option<SessionId>,
    logout: bool,
}

impl SharedWork for RevokeJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let revoked = match store.revoke_sessions(self.user, self.which, now_ms()) {
            Ok(revoked) => revoked,
            Err(e) => return vec![refuse(self.to, store_error(&e))],
        };
        let mut effects = Vec::new();
        if self.logout {
            // The connection stays, logged out, and is not told to go.
            effects.push(Effect::LoggedOut { to: self.to });
            effects.push(reply(self.to, ServerFrame::Done(Default::default())));
        } else {
            let count = u32::try_from(revoked.len()).unwrap_or(u32::MAX);
            effects.push(reply(self.to, ServerFrame::SessionsRevoked(SessionsRevoked { count })));
        }
        // After the reply: the asking connection, if its session was revoked, hears why it ends.
        effects.push(Effect::EndSessions { sessions: revoked, code: ErrorCode::SESSION_REVOKED });
        effects
    }
}

/// LIST_SESSIONS.
struct ListSessionsJob {
    to: ReplyTo,
    user: UserId,
    current: SessionId,
    online: Vec<SessionId>,
    after: SessionId,
    limit: u32,
}

impl SharedWork for ListSessionsJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, settings: &Settings) -> Vec<Effect> {
        let now = now_ms();
        let all = match store.list_sessions(self.user, now, &settings.session_limits) {
            Ok(all) => all,
            Err(e) => return vec![refuse(self.to, store_error(&e))],
        };
        let limit = self.limit as usize;
        let mut page: Vec<SessionInfo> = all
            .into_iter()
            .filter(|s| s.id > self.after)
            .take(limit + 1)
            .map(|s| SessionInfo {
                session: s.id,
                last_seen_ms: if self.online.contains(&s.id) { now } else { s.last_used_at_ms },
                current: s.id == self.current,
                ip: s.ip,
                user_agent: s.user_agent,
                created_ms: s.created_at_ms,
            })
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let next_after = if more { page.last().map(|s| s.session) } else { None };
        vec![reply(self.to, ServerFrame::SessionList(SessionList { sessions: page, next_after }))]
    }
}

/// The last use of sessions.
struct TouchJob {
    sessions: Vec<SessionId>,
}

impl SharedWork for TouchJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        None
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        if let Err(e) = store.touch_sessions(&self.sessions, now_ms()) {
            log::debug!("recording the last use of {} sessions failed: {e}", self.sessions.len());
        }
        Vec::new()
    }
}
