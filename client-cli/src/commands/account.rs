//! `register`, `login` and `logout`: getting, storing and revoking the session token; `sessions`:
//! the account's sessions (devices), and revoking them; `profile` and `settings`: the account's
//! email and display name, and the settings the server keeps for all its devices.

use crate::connect::{describe, user_agent, CallError, Ctx};
use crate::output::rfc3339_ms;
use crate::password::password;
use anyhow::anyhow;
use chime_client::blocking::ClientError;
use chime_client::home::Session;
use chime_protocol::{Authed, ErrorCode, Profile};
use serde_json::json;

/// `register USER [--email E] [--display-name N]`: creates the account and logs in, then sets the
/// email and display name if given.
///
/// REGISTER itself carries neither (its body is shared with LOGIN, and bodies only grow in a new
/// protocol version), so they are an UPDATE_PROFILE on the new session. Should that be refused
/// (the email is another account's), the account exists and is logged in all the same: the user
/// record is printed and the error says how to set the profile later.
pub fn register(ctx: &mut Ctx, user: &str, email: Option<&str>, display_name: Option<&str>) -> Result<(), CallError> {
    let password = password(ctx.password_stdin, user, true)?;
    let mut client = ctx.connect()?;
    let authed = client.register(user, &password, &user_agent())?;
    let email = email.filter(|e| !e.is_empty());
    if email.is_none() && display_name.is_none() {
        return store(ctx, authed, "registered and logged in as");
    }
    let session = keep(ctx, authed)?;
    match client.update_profile(email.map(Some), display_name) {
        Ok(profile) => {
            let what =
                format!("registered and logged in as {} (user {}) on {}", profile.user, profile.user_id, ctx.server);
            print_profile(ctx, &profile, &what)
        }
        Err(e) => {
            print_user(ctx, &session, "registered and logged in as")?;
            Err(CallError::Local(anyhow!(
                "{} is registered, but its profile was not set: {}; set it with `chime profile`",
                session.user,
                describe(&e, &ctx.server)
            )))
        }
    }
}

/// `login USER`: logs in and stores the token.
pub fn login(ctx: &mut Ctx, user: &str) -> Result<(), CallError> {
    let password = password(ctx.password_stdin, user, false)?;
    let mut client = ctx.connect()?;
    let authed = client.login(user, &password, &user_agent())?;
    store(ctx, authed, "logged in as")
}

/// Stores the session of a fresh `AUTHED` and prints who is logged in.
fn store(ctx: &mut Ctx, authed: Authed, what: &str) -> Result<(), CallError> {
    let session = keep(ctx, authed)?;
    print_user(ctx, &session, what)
}

/// Stores the session of a fresh `AUTHED` in the home.
fn keep(ctx: &mut Ctx, authed: Authed) -> Result<Session, CallError> {
    let token = authed.token.ok_or_else(|| anyhow!("{} sent no session token with AUTHED", ctx.server))?;
    let session = Session { token, user: authed.user, user_id: authed.user_id.get() };
    ctx.home.store_session(&ctx.server, session.clone())?;
    Ok(session)
}

/// `logout`: revokes the token on the server, then forgets it.
///
/// A token the server already refuses is forgotten too, since the goal (no valid session) holds;
/// when the server cannot be reached the token is kept so that `logout` can be run again.
pub fn logout(ctx: &mut Ctx) -> Result<(), CallError> {
    let session = ctx.session()?;
    let mut client = ctx.connect()?;
    match client.resume(&session.token, &user_agent()) {
        Ok(_) => client.logout()?,
        Err(ClientError::Server(body)) if body.code == ErrorCode::AUTH_FAILED => {
            log::info!("the server no longer knew the session: {body}");
        }
        Err(e) => return Err(e.into()),
    }
    ctx.home.remove_session(&ctx.server)?;
    print_user(ctx, &session, "logged out")
}

/// `whoami`: the user this home's session logs in as, as the server knows it.
pub fn whoami(ctx: &mut Ctx) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let me = client.whoami()?;
    ctx.out.record(
        &json!({"user": me.user, "user_id": me.user_id, "session": me.session}),
        &format!("{} (user {}, session {})", me.user, me.user_id, me.session),
    )?;
    Ok(())
}

/// `profile` / `profile USER`: the user's own profile with its email, or another user's public
/// one (whose record has no `email` key: it is never shown to anyone else).
pub fn show_profile(ctx: &mut Ctx, user: Option<&str>) -> Result<(), CallError> {
    let (mut client, session) = ctx.connect_authed()?;
    let profile = client.profile(user)?;
    let what = format!("{} (user {})", profile.user, profile.user_id);
    print_profile_of(ctx, &profile, &what, profile.user_id == session.user_id)
}

/// `profile --email E | --clear-email | --display-name N`: changes what is given, prints the
/// profile after.
pub fn change_profile(
    ctx: &mut Ctx,
    email: Option<Option<String>>,
    display_name: Option<&str>,
) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let profile = client.update_profile(email.as_ref().map(Option::as_deref), display_name)?;
    let what = format!("updated {} (user {})", profile.user, profile.user_id);
    print_profile(ctx, &profile, &what)
}

/// Prints one's own profile: `{"user":..,"user_id":..,"email":..|null,"display_name":..}`.
fn print_profile(ctx: &mut Ctx, profile: &Profile, what: &str) -> Result<(), CallError> {
    print_profile_of(ctx, profile, what, true)
}

/// Prints a profile, with its email when it is the user's own.
fn print_profile_of(ctx: &mut Ctx, profile: &Profile, what: &str, own: bool) -> Result<(), CallError> {
    let mut record = json!({"user": profile.user, "user_id": profile.user_id, "display_name": profile.display_name});
    let mut human = format!("{what}: display name \"{}\"", profile.display_name);
    if own {
        record["email"] = json!(profile.email);
        match &profile.email {
            Some(email) => human.push_str(&format!(", email {email}")),
            None => human.push_str(", no email"),
        }
    }
    ctx.out.record(&record, &human)?;
    Ok(())
}

/// `settings`: one `{"key":..,"value":..}` per setting: the account-wide ones (with their
/// defaults), then the rooms whose notification level is not the default `all`.
pub fn settings(ctx: &mut Ctx) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    for s in client.settings()?.entries {
        ctx.out.record(&json!({"key": s.key, "value": s.value}), &format!("{} = {}", s.key, s.value))?;
    }
    Ok(())
}

/// `settings KEY VALUE`: stores the setting (the server checks it and tells the user's other
/// devices) and prints it as stored. A room may be written `notify.#3`, as the human output
/// writes room ids.
pub fn set_setting(ctx: &mut Ctx, key: &str, value: &str) -> Result<(), CallError> {
    let key = match key.strip_prefix("notify.#") {
        Some(room) => format!("notify.{room}"),
        None => key.to_string(),
    };
    let (mut client, _) = ctx.connect_authed()?;
    let stored = client.set_setting(&key, value)?;
    ctx.out
        .record(&json!({"key": stored.key, "value": stored.value}), &format!("{} = {}", stored.key, stored.value))?;
    Ok(())
}

/// `sessions`: one record per live session of the account.
pub fn sessions(ctx: &mut Ctx) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    for s in client.list_sessions()? {
        let last_seen = rfc3339_ms(s.last_seen_ms);
        let created = rfc3339_ms(s.created_ms);
        ctx.out.record(
            &json!({
                "session": s.session,
                "ip": s.ip,
                "user_agent": s.user_agent,
                "created": created,
                "last_seen": last_seen,
                "current": s.current,
            }),
            &format!(
                "{}{:<6} {:<15} {}  since {created}, last seen {}",
                if s.current { "* " } else { "  " },
                s.session,
                s.ip,
                s.user_agent,
                if s.current { "now (this session)".to_string() } else { last_seen },
            ),
        )?;
    }
    Ok(())
}

/// `sessions revoke ID` / `sessions revoke --all` (`which` = `None`): the server ends every
/// connection of the revoked sessions at once. When this session is among them, its stored token
/// is forgotten, as after `logout`.
pub fn revoke(ctx: &mut Ctx, which: Option<u64>) -> Result<(), CallError> {
    let (mut client, session) = ctx.connect_authed()?;
    let this_one = match which {
        None => true,
        Some(id) => client.list_sessions()?.iter().any(|s| s.current && s.session == id),
    };
    let count = client.revoke_sessions(which)?;
    if this_one {
        ctx.home.remove_session(&ctx.server)?;
    }
    let what = match which {
        Some(id) if count > 0 => format!("revoked session {id}"),
        Some(id) => format!("session {id} is not a live session of {}; nothing revoked", session.user),
        None => format!("revoked all {count} sessions of {}", session.user),
    };
    let logged_out = if this_one { " (this one included: logged out here)" } else { "" };
    ctx.out.record(&json!({"revoked": count, "logged_out": this_one}), &format!("{what}{logged_out}"))?;
    Ok(())
}

/// Prints `{"user":..,"user_id":..}`.
fn print_user(ctx: &mut Ctx, session: &Session, what: &str) -> Result<(), CallError> {
    ctx.out.record(
        &json!({"user": session.user, "user_id": session.user_id}),
        &format!("{what} {} (user {}) on {}", session.user, session.user_id, ctx.server),
    )?;
    Ok(())
}
