//! `register`, `login` and `logout`: getting, storing and revoking the session token.

use crate::connect::{user_agent, CallError, Ctx};
use crate::home::Session;
use crate::password::password;
use anyhow::anyhow;
use chime_protocol::client::ClientError;
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
    let session = Session { token, user: authed.user, user_id: authed.user_id };
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

/// Prints `{"user":..,"user_id":..}`.
fn print_user(ctx: &mut Ctx, session: &Session, what: &str) -> Result<(), CallError> {
    ctx.out.record(
        &json!({"user": session.user, "user_id": session.user_id}),
        &format!("{what} {} (user {}) on {}", session.user, session.user_id, ctx.server),
    )?;
    Ok(())
}
