//! `register`, `login` and `logout`: getting, storing and revoking the session token; `sessions`:
//! the account's sessions (devices), and revoking them.

use crate::connect::{user_agent, CallError, Ctx};
use crate::output::rfc3339_ms;
use crate::password::password;
use anyhow::anyhow;
use chime_client::blocking::ClientError;
use chime_client::home::Session;
use chime_protocol::{Authed, ErrorCode};
use serde_json::json;

/// `register USER`: creates the account and logs in.
pub fn register(ctx: &mut Ctx, user: &str) -> Result<(), CallError> {
    let password = password(ctx.password_stdin, user, true)?;
    let mut client = ctx.connect()?;
    let authed = client.register(user, &password, &user_agent())?;
    store(ctx, authed, "registered and logged in as")
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
    let token = authed.token.ok_or_else(|| anyhow!("{} sent no session token with AUTHED", ctx.server))?;
    let session = Session { token, user: authed.user, user_id: authed.user_id.get() };
    ctx.home.store_session(&ctx.server, session.clone())?;
    print_user(ctx, &session, what)
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
