//! (h) LOGOUT revokes the session token: resuming with it afterwards fails with AUTH_FAILED.
//! Password logins are rate limited (a reconnect storm cannot pin the auth workers), with a
//! retryable error, while token resumes are not.

use crate::util::*;
use chime_protocol::ErrorCode;
use chime_tests::daemon::{Backend, Daemon, PASSWORD};

on_both_stores!(logout_revokes_token, login_storm_is_rate_limited);

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

fn login_storm_is_rate_limited(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "login_rate", &["--login-rate", "5"]) else { return };
    let alice = d.register("alice");
    // Two seconds for the registration's token to be replaced in the bucket.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut limited = 0;
    let mut ok = 0;
    for _ in 0..20 {
        let mut c = d.client();
        match c.login(&alice.name, PASSWORD, "storm") {
            Ok(_) => ok += 1,
            Err(chime_client::blocking::ClientError::Server(e)) => {
                assert_eq!(e.code, ErrorCode::RATE_LIMITED, "{e:?}");
                assert!(e.retryable, "RATE_LIMITED must be retryable");
                limited += 1;
            }
            Err(e) => panic!("login: {e:?}"),
        }
    }
    assert!(ok >= 1, "some logins get through");
    assert!(limited >= 10, "a burst of 20 against 5/s must be limited, got {limited} refusals");
    // Resuming with a token is limited per address, not by the password-login rate: 20 fit in
    // its default burst.
    for _ in 0..20 {
        d.resume(&alice.token);
    }
    // The bucket refills: a login a second later succeeds.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let mut c = d.client();
    c.login(&alice.name, PASSWORD, "later").expect("login after the storm");
}
