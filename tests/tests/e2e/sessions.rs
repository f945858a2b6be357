//! Sessions (devices): revoking one ends every connection logged in with it at once (LOGOUT
//! included), a user lists and revokes their sessions (`chime sessions`), and sessions expire
//! after an idle and an absolute lifetime, live connections included.

use crate::util::*;
use chime_client::blocking::{Client, ClientError};
use chime_protocol::{ErrorCode, ServerFrame};
use chime_tests::daemon::{Backend, Daemon};
use std::time::{Duration, Instant};

on_both_stores!(logout_ends_every_connection_of_the_session, users_list_and_revoke_their_sessions, sessions_expire);

/// Waits until the server ends `client`'s connection; returns the GOODBYE's code (panics after
/// `timeout`, or on anything but pushes and pings meanwhile).
fn goodbye_code(client: &mut Client, timeout: Duration) -> ErrorCode {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the connection is still open after {timeout:?}");
        match client.recv(Some(left)) {
            Err(ClientError::Closed(Some(goodbye))) => return goodbye.code,
            Err(other) => panic!("connection ended without a GOODBYE: {other:?}"),
            Ok(Some((0, ServerFrame::Delta(_)))) | Ok(None) => {}
            Ok(other) => panic!("unexpected frame before the GOODBYE: {other:?}"),
        }
    }
}

fn logout_ends_every_connection_of_the_session(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "logout_all", &[]) else { return };
    let mut alice = d.register("alice");
    let room = alice.client.create_room("r").expect("create").room;
    // Two more connections of the same session (a phone and a laptop sharing a token, say).
    let mut phone = d.resume(&alice.token);
    let mut laptop = d.resume(&alice.token);
    // Another session of the same user is not affected.
    let mut other = d.client();
    other.login(&alice.name, chime_tests::daemon::PASSWORD, "other device").expect("login");
    alice.client.logout().expect("LOGOUT");
    let started = Instant::now();
    assert_eq!(goodbye_code(&mut phone, Duration::from_secs(5)), ErrorCode::SESSION_REVOKED);
    assert_eq!(goodbye_code(&mut laptop, Duration::from_secs(5)), ErrorCode::SESSION_REVOKED);
    eprintln!("{backend:?}: both connections of the revoked session ended {:?} after LOGOUT", started.elapsed());
    // The connection that logged out stays open, logged out.
    assert_eq!(server_code("POST after LOGOUT", alice.client.post(room, "k1", "x")), ErrorCode::NOT_AUTHENTICATED);
    alice.client.ping().expect("still connected");
    // The other session still works, and receives nothing from the revoked one.
    other.post(room, "k2", "still here").expect("the other session posts");
    let mut again = d.client();
    assert_eq!(server_code("RESUME after LOGOUT", again.resume(&alice.token, "t")), ErrorCode::AUTH_FAILED);
}

fn users_list_and_revoke_their_sessions(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "session_list", &[]) else { return };
    let name = unique("sess");
    let home_a = tempfile::tempdir().expect("home");
    let home_b = tempfile::tempdir().expect("home");
    let mut register = d.cli(home_a.path());
    register.args(["register", &name]);
    cli_ok(register);
    let mut login = d.cli(home_b.path());
    login.args(["login", &name]);
    cli_ok(login);
    // A third device that stays connected.
    let mut device = d.client();
    device.login(&name, chime_tests::daemon::PASSWORD, "device three").expect("login");

    let mut list = d.cli(home_a.path());
    list.arg("sessions");
    let sessions = cli_ok(list);
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    for s in &sessions {
        json_u64(s, "session");
        assert_eq!(json_str(s, "ip"), "127.0.0.1", "{s}");
        assert!(is_rfc3339(json_str(s, "last_seen")), "{s}");
        assert!(s.get("current").and_then(|c| c.as_bool()).is_some(), "{s}");
        json_str(s, "user_agent");
    }
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1, "exactly one is this session");
    let device_session = sessions.iter().find(|s| json_str(s, "user_agent") == "device three").expect("the device");
    let device_id = json_u64(device_session, "session");
    let home_b_id = sessions
        .iter()
        .find(|s| s["current"] == false && json_u64(s, "session") != device_id)
        .map(|s| json_u64(s, "session"))
        .expect("home B's session");

    // Revoking the device's session from home A ends its live connection.
    let mut revoke = d.cli(home_a.path());
    revoke.args(["sessions", "revoke", &device_id.to_string()]);
    let out = cli_ok(revoke);
    assert_eq!(json_u64(&out[0], "revoked"), 1);
    assert_eq!(goodbye_code(&mut device, Duration::from_secs(5)), ErrorCode::SESSION_REVOKED);
    let mut list = d.cli(home_b.path());
    list.arg("sessions");
    assert_eq!(cli_ok(list).len(), 2);

    // Revoking another user's session id does nothing.
    let mut stranger = d.register("stranger");
    assert_eq!(stranger.client.revoke_sessions(Some(home_b_id)).expect("revoke"), 0);

    // --all from home B: every session ends, home B's stored token is forgotten, home A's refused.
    let mut tail = Tail::spawn({
        let mut c = d.cli(home_a.path());
        c.args(["room", "create", "watched"]);
        let room = json_u64(&cli_ok(c)[0], "room");
        let mut t = d.cli(home_a.path());
        t.args(["tail", &room.to_string()]);
        t
    });
    let _ = tail.next(Duration::from_millis(300));
    let mut revoke_all = d.cli(home_b.path());
    revoke_all.args(["sessions", "revoke", "--all"]);
    let out = cli_ok(revoke_all);
    assert_eq!(json_u64(&out[0], "revoked"), 2);
    let mut rooms = d.cli(home_b.path());
    rooms.arg("rooms");
    let (code, _, stderr) = cli_run(&mut rooms);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not logged in"), "{stderr}");
    let mut rooms = d.cli(home_a.path());
    rooms.arg("rooms");
    let (code, _, stderr) = cli_run(&mut rooms);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("refused"), "{stderr}");
    tail.kill();
}

fn sessions_expire(backend: Backend) {
    let Some(d) =
        Daemon::start_backend(backend, "expiry", &["--session-idle-secs", "3", "--session-max-age-secs", "6"])
    else {
        return;
    };
    // A connection kept open longer than the idle lifetime: when it closes its session was in use
    // until then, so resuming right after works.
    let alice = d.register("alice");
    let mut keeper = alice.client;
    std::thread::sleep(Duration::from_millis(4000));
    keeper.ping().expect("still open");
    drop(keeper);
    std::thread::sleep(Duration::from_millis(300));
    let mut back = d.resume(&alice.token);
    // The absolute lifetime ends even a live connection, about six seconds after the login.
    let code = goodbye_code(&mut back, Duration::from_secs(6));
    assert_eq!(code, ErrorCode::SESSION_EXPIRED);
    let mut again = d.client();
    assert_eq!(server_code("RESUME after the lifetime", again.resume(&alice.token, "t")), ErrorCode::AUTH_FAILED);
    // Idle: a session nobody uses for longer than three seconds is gone.
    let bob = d.register("bob");
    drop(bob.client);
    std::thread::sleep(Duration::from_millis(4500));
    let mut late = d.client();
    assert_eq!(server_code("RESUME after idling", late.resume(&bob.token, "t")), ErrorCode::AUTH_FAILED);
}
