//! (h) LOGOUT revokes the session token: resuming with it afterwards fails with AUTH_FAILED.

use crate::util::*;
use chime_protocol::ErrorCode;
use chime_tests::daemon::{Backend, Daemon, PASSWORD};

on_both_stores!(logout_revokes_token);

fn logout_revokes_token(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "auth", &[]) else { return };
    let mut alice = d.register("alice");
    // The token works from another connection while the session lives.
    let mut second = d.resume(&alice.token);
    second.list_rooms().expect("resumed session works");
    alice.client.logout().expect("logout");
    let mut third = d.client();
    assert_eq!(server_code("RESUME after LOGOUT", third.resume(&alice.token, "t")), ErrorCode::AUTH_FAILED);
    // A wrong password is refused the same way; the right one still logs in.
    let mut fourth = d.client();
    assert_eq!(server_code("LOGIN", fourth.login(&alice.name, "wrong password!", "t")), ErrorCode::AUTH_FAILED);
    let mut fifth = d.client();
    let authed = fifth.login(&alice.name, PASSWORD, "t").expect("login");
    assert_eq!(authed.user_id, alice.user_id);
    assert!(authed.token.is_some_and(|t| t != alice.token));
}
