//! Accounts and sessions: REGISTER, LOGIN, RESUME, LOGOUT, LIST_SESSIONS, REVOKE_SESSIONS, WHOAMI,
//! the record of when sessions were last used, and the account's profile (GET_PROFILE,
//! UPDATE_PROFILE) and settings (GET_SETTINGS, SET_SETTING).
//!
//! Password hashing (argon2id, slow on purpose) runs on the auth workers, never on the loop or in
//! front of anyone's post. A successful login yields [`Effect::LoggedIn`] with the user's rooms as
//! read then; the core subscribes the connection and catches it up on anything published since.
//! Revoking sessions yields [`Effect::EndSessions`]: every connection of them ends at once.
//!
//! Profiles and settings are checked on the loop ([`auth::validate_email`],
//! [`auth::display_name`], [`user_settings::parse`]) and read or written on the shared queue. A
//! stored setting yields [`Effect::PushToUser`]: the user's other connections get a
//! `SETTING_CHANGED` with the settings version the change made, so a device keeps the newest state
//! whichever order two racing changes reach it in.

use super::{invalid, page_size, Admitted, Ctx, Limiters};
use crate::auth;
use crate::limits::{MAX_PASSWORD, MAX_USER_AGENT};
use crate::user_settings::{self, Change};
use crate::work::{refuse, reply, store_error, AuthWork, Effect, EncodeReply, ReplyTo, Settings, SharedWork, Work};
use chime_protocol::{
    Authed, Credentials, ErrorBody, ErrorCode, GetProfile, GetSettings, Identity, ListSessions, Profile, Resume,
    RevokeSessions, RoomId, ServerFrame, SessionInfo, SessionList, SessionsRevoked, SetSetting, SettingChanged,
    UpdateProfile,
};
use chime_storage::{
    now_ms, NewSession, ProfileRecord, ProfileUpdate, SessionId, SessionRecord, SharedStore, StoreError, UserId,
};
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

/// Admits GET_PROFILE: one's own profile, or another user's by name. A name that breaks the rules
/// for user names belongs to nobody, so it is answered at once.
pub fn get_profile(ctx: &mut Ctx<'_>, g: GetProfile) -> Result<Admitted, ErrorBody> {
    let me = &ctx.who.actor;
    let name = g.user.filter(|name| name.as_str() != &*me.name);
    if let Some(name) = &name {
        if auth::validate_user_name(name).is_err() {
            return Err(no_such_user(name));
        }
    }
    let job = ProfileJob { to: ctx.to, asker: me.user_id, name };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits UPDATE_PROFILE: an email of the right shape (or its removal), a display name of 1 to 64
/// visible characters after trimming. An update that changes nothing reads the profile.
pub fn update_profile(ctx: &mut Ctx<'_>, u: UpdateProfile) -> Result<Admitted, ErrorBody> {
    if let Some(Some(email)) = &u.email {
        auth::validate_email(email).map_err(invalid)?;
    }
    let display_name = u.display_name.as_deref().map(auth::display_name).transpose().map_err(invalid)?;
    let update = ProfileUpdate { email: u.email, display_name };
    let job = UpdateProfileJob { to: ctx.to, user: ctx.who.actor.user_id, update };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits GET_SETTINGS: one page.
pub fn get_settings(ctx: &mut Ctx<'_>, g: GetSettings) -> Result<Admitted, ErrorBody> {
    let job = SettingsJob { to: ctx.to, user: ctx.who.actor.user_id, after: g.after_room, limit: page_size(g.limit) };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// Admits SET_SETTING: a known key and one of its values (`INVALID_ARGUMENT` names the allowed
/// ones); membership of a `notify.ROOM`'s room is the store's to check.
pub fn set_setting(ctx: &mut Ctx<'_>, s: SetSetting) -> Result<Admitted, ErrorBody> {
    let change = user_settings::parse(&s.key, &s.value).map_err(invalid)?;
    let job = SetSettingJob { to: ctx.to, user: ctx.who.actor.user_id, change };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// The refusal of a profile that does not exist.
fn no_such_user(name: &str) -> ErrorBody {
    let shown: String = name.chars().take(auth::MAX_USER_NAME_LEN).collect();
    ErrorBody::new(ErrorCode::NOT_FOUND, format!("no user named {shown:?}"))
}

/// A stored profile as `PROFILE` carries it: the display name defaults to the user name, and the
/// email is only ever shown to its owner.
fn profile(record: ProfileRecord, own: bool) -> Profile {
    Profile {
        user_id: record.id,
        display_name: record.display_name.unwrap_or_else(|| record.name.clone()),
        user: record.name,
        email: if own { record.email } else { None },
    }
}

/// GET_PROFILE.
struct ProfileJob {
    to: ReplyTo,
    asker: UserId,
    /// Another user's name; `None` for the asker.
    name: Option<String>,
}

impl SharedWork for ProfileJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let found = match &self.name {
            None => store.profile(self.asker),
            Some(name) => store.profile_by_name(name),
        };
        vec![match found {
            Ok(Some(record)) => {
                let own = record.id == self.asker;
                reply(self.to, ServerFrame::Profile(profile(record, own)))
            }
            Ok(None) => refuse(
                self.to,
                match &self.name {
                    Some(name) => no_such_user(name),
                    None => ErrorBody::new(ErrorCode::NOT_FOUND, "this account no longer exists"),
                },
            ),
            Err(e) => refuse(self.to, store_error(&e)),
        }]
    }
}

/// UPDATE_PROFILE.
struct UpdateProfileJob {
    to: ReplyTo,
    user: UserId,
    update: ProfileUpdate,
}

impl SharedWork for UpdateProfileJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        vec![match store.update_profile(self.user, &self.update) {
            Ok(record) => reply(self.to, ServerFrame::Profile(profile(record, true))),
            // The only unique value an update writes is the email.
            Err(StoreError::Conflict(message)) => refuse(self.to, ErrorBody::new(ErrorCode::EMAIL_TAKEN, message)),
            Err(e) => refuse(self.to, store_error(&e)),
        }]
    }
}

/// GET_SETTINGS: one page.
struct SettingsJob {
    to: ReplyTo,
    user: UserId,
    after: RoomId,
    limit: u32,
}

impl SharedWork for SettingsJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let mut record = match store.settings(self.user, self.after, self.limit.saturating_add(1)) {
            Ok(record) => record,
            Err(e) => return vec![refuse(self.to, store_error(&e))],
        };
        let limit = self.limit as usize;
        let more = record.notify.len() > limit;
        record.notify.truncate(limit);
        let next_after = if more { record.notify.last().map(|&(room, _)| room) } else { None };
        let entries = user_settings::entries(&record, self.after == RoomId(0));
        let page = chime_protocol::Settings { version: record.version, entries, next_after };
        vec![reply(self.to, ServerFrame::Settings(page))]
    }
}

/// SET_SETTING: stored with a new settings version, answered, and pushed to the user's other
/// connections.
struct SetSettingJob {
    to: ReplyTo,
    user: UserId,
    change: Change,
}

impl SharedWork for SetSettingJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let version = match store.set_setting(self.user, &self.change.write()) {
            Ok(version) => version,
            Err(e) => return vec![refuse(self.to, store_error(&e))],
        };
        let changed = SettingChanged { version, key: self.change.key(), value: self.change.value().to_string() };
        vec![
            reply(self.to, ServerFrame::Setting(changed.clone())),
            Effect::PushToUser {
                user: self.user,
                except: Some(self.to.conn),
                frame: ServerFrame::SettingChanged(changed).reply(0),
            },
        ]
    }
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
    let read = store.rooms_of_user(user).and_then(|rooms| Ok((rooms, server_ids(store, user)?)));
    match read {
        Ok((rooms, servers)) => {
            let effects = vec![
                Effect::LoggedIn {
                    to,
                    user,
                    name: name.clone(),
                    session,
                    rooms: rooms.iter().map(|r| (r.id, r.last_seq)).collect(),
                    servers,
                },
                reply(to, ServerFrame::Authed(Authed { user_id: user, user: name, token })),
            ];
            effects
        }
        Err(e) => vec![refuse(to, store_error(&e))],
    }
}

/// Every server the user is in (at most the rooms-per-user cap), page by page.
fn server_ids(store: &mut dyn SharedStore, user: UserId) -> chime_storage::Result<Vec<chime_storage::ServerId>> {
    let mut ids = Vec::new();
    let mut after = chime_storage::ServerId(0);
    loop {
        let page = store.servers_page(user, after, crate::limits::MAX_PAGE)?;
        let full = page.len() == crate::limits::MAX_PAGE as usize;
        ids.extend(page.iter().map(|s| s.id));
        match ids.last() {
            Some(&last) if full => after = last,
            _ => return Ok(ids),
        }
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

#[cfg(test)]
mod tests {
    //! The profile and settings jobs against a real (SQLite) store: what each answers, and what
    //! it asks the loop to do.

    use super::*;
    use crate::work::ConnRef;
    use bytes::BytesMut;
    use chime_protocol::{FrameDecoder, Setting};
    use chime_storage::{RoomKind, SessionLimits, Store};

    fn settings() -> Settings {
        Settings {
            max_rooms_per_user: 10,
            session_limits: SessionLimits { idle_ms: 60_000, max_age_ms: 60_000 },
            notifier: None,
            content: None,
        }
    }

    fn to(rid: u32) -> ReplyTo {
        ReplyTo { conn: ConnRef { key: 1, gen: 1 }, request_id: rid }
    }

    fn decode(bytes: &[u8]) -> (u32, ServerFrame) {
        let raw = FrameDecoder::default().decode(&mut BytesMut::from(bytes)).expect("valid").expect("whole");
        (raw.request_id, ServerFrame::decode(&raw).expect("a server frame"))
    }

    /// Runs a job and decodes what it replies; other effects are returned as they are.
    fn run(job: impl SharedWork + 'static, store: &mut dyn Store) -> (Vec<(u32, ServerFrame)>, Vec<Effect>) {
        let (mut replies, mut others) = (Vec::new(), Vec::new());
        for effect in Box::new(job).run(store, &settings()) {
            match effect {
                Effect::Reply { frame, .. } => replies.push(decode(&frame)),
                other => others.push(other),
            }
        }
        (replies, others)
    }

    fn store() -> (tempfile::TempDir, Box<dyn Store>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = chime_storage::open(&format!("sqlite:{}", dir.path().join("a.db").display())).expect("open");
        (dir, store)
    }

    fn error_code(replies: &[(u32, ServerFrame)]) -> ErrorCode {
        match replies {
            [(_, ServerFrame::Error(e))] => e.code,
            other => panic!("expected one ERROR, got {other:?}"),
        }
    }

    #[test]
    fn an_email_is_shown_to_its_owner_only_and_a_taken_one_is_email_taken() {
        let (_dir, mut store) = store();
        let ann = store.create_user("ann", "h").expect("ann").id;
        let bob = store.create_user("bob", "h").expect("bob").id;
        let update = ProfileUpdate { email: Some(Some("Ann@x.org".into())), display_name: None };
        let (replies, _) = run(UpdateProfileJob { to: to(2), user: ann, update }, &mut *store);
        let own =
            Profile { user_id: ann, user: "ann".into(), email: Some("Ann@x.org".into()), display_name: "ann".into() };
        assert_eq!(replies, [(2, ServerFrame::Profile(own.clone()))], "the display name defaults to the user name");

        let (replies, _) = run(ProfileJob { to: to(3), asker: bob, name: Some("ann".into()) }, &mut *store);
        assert_eq!(replies, [(3, ServerFrame::Profile(Profile { email: None, ..own.clone() }))]);
        let (replies, _) = run(ProfileJob { to: to(4), asker: ann, name: None }, &mut *store);
        assert_eq!(replies, [(4, ServerFrame::Profile(own))]);
        let (replies, _) = run(ProfileJob { to: to(5), asker: ann, name: Some("nobody".into()) }, &mut *store);
        assert_eq!(error_code(&replies), ErrorCode::NOT_FOUND);

        let update = ProfileUpdate { email: Some(Some("ann@X.ORG".into())), display_name: None };
        let (replies, _) = run(UpdateProfileJob { to: to(6), user: bob, update }, &mut *store);
        assert_eq!(error_code(&replies), ErrorCode::EMAIL_TAKEN);
    }

    #[test]
    fn a_stored_setting_is_answered_and_pushed_to_the_other_connections() {
        let (_dir, mut store) = store();
        let ann = store.create_user("ann", "h").expect("ann");
        let change = user_settings::parse("media.auto_load", "False").expect("valid");
        let (replies, effects) = run(SetSettingJob { to: to(2), user: ann.id, change }, &mut *store);
        let changed = SettingChanged { version: 1, key: "media.auto_load".into(), value: "false".into() };
        assert_eq!(replies, [(2, ServerFrame::Setting(changed.clone()))]);
        match &effects[..] {
            [Effect::PushToUser { user, except, frame }] => {
                assert_eq!((*user, *except), (ann.id, Some(to(2).conn)));
                assert_eq!(decode(frame), (0, ServerFrame::SettingChanged(changed)));
            }
            other => panic!("{other:?}"),
        }

        // A room the user is not in: refused, nothing pushed.
        let (room, _) = store.create_room("r", RoomKind::GROUP, ann.id, "ann", 1, 10).expect("room");
        let bob = store.create_user("bob", "h").expect("bob").id;
        let change = user_settings::parse(&format!("notify.{}", room.id), "none").expect("valid");
        let (replies, effects) = run(SetSettingJob { to: to(3), user: bob, change }, &mut *store);
        assert_eq!(error_code(&replies), ErrorCode::NOT_MEMBER);
        assert!(effects.is_empty());

        let change = user_settings::parse(&format!("notify.{}", room.id), "none").expect("valid");
        run(SetSettingJob { to: to(4), user: ann.id, change }, &mut *store);
        let (replies, _) = run(SettingsJob { to: to(5), user: ann.id, after: RoomId(0), limit: 500 }, &mut *store);
        let setting = |key: &str, value: &str| Setting { key: key.into(), value: value.into() };
        let expected = chime_protocol::Settings {
            version: 2,
            entries: vec![
                setting("media.auto_load", "false"),
                setting("media.low_quality_images", "false"),
                setting(&format!("notify.{}", room.id), "none"),
            ],
            next_after: None,
        };
        assert_eq!(replies, [(5, ServerFrame::Settings(expected))]);
    }

    #[test]
    fn settings_pages_follow_the_rooms_and_only_the_first_lists_the_account() {
        let (_dir, mut store) = store();
        let ann = store.create_user("ann", "h").expect("ann");
        let mut rooms = Vec::new();
        for i in 0..3 {
            let (room, _) = store.create_room(&format!("r{i}"), RoomKind::GROUP, ann.id, "ann", 1, 10).expect("room");
            let change = user_settings::parse(&format!("notify.{}", room.id), "mentions").expect("valid");
            run(SetSettingJob { to: to(2), user: ann.id, change }, &mut *store);
            rooms.push(room.id);
        }
        let page = |after, store: &mut dyn Store| match &run(
            SettingsJob { to: to(3), user: ann.id, after, limit: 2 },
            store,
        )
        .0[..]
        {
            [(_, ServerFrame::Settings(s))] => s.clone(),
            other => panic!("{other:?}"),
        };
        let first = page(RoomId(0), &mut *store);
        assert_eq!(first.entries.len(), 2 + 2);
        assert_eq!(first.next_after, Some(rooms[1]));
        let second = page(rooms[1], &mut *store);
        assert_eq!(second.entries.iter().map(|s| s.key.clone()).collect::<Vec<_>>(), [format!("notify.{}", rooms[2])]);
        assert_eq!((second.next_after, second.version), (None, 3));
    }
}
