//! Typing and presence through the real daemon: typing reaches a room's other online readers,
//! throttled; presence reaches only those who watch it (a member list shown), with online, away,
//! offline and last seen; `chime presence`, `chime typing` and `chime members` with presence.

use crate::util::*;
use chime_client::blocking::Client;
use chime_protocol::{ErrorCode, PresenceEntry, PresenceStatus, RoomId, ServerFrame, TypingNow, UserId};
use chime_tests::daemon::{Backend, Daemon};
use std::time::{Duration, Instant};

on_both_stores!(typing_and_presence_reach_only_who_sees_them);
on_both_stores!(last_seen_survives_a_restart);

fn next_push<T>(client: &mut Client, timeout: Duration, pick: impl Fn(ServerFrame) -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match client.recv(Some(left)) {
            Ok(Some((0, frame))) => {
                if let Some(v) = pick(frame) {
                    return Some(v);
                }
            }
            Ok(_) => {}
            Err(e) => panic!("waiting for a push: {e:?}"),
        }
    }
}

fn typing(f: ServerFrame) -> Option<TypingNow> {
    match f {
        ServerFrame::TypingNow(t) => Some(t),
        _ => None,
    }
}

fn presence(f: ServerFrame) -> Option<PresenceEntry> {
    match f {
        ServerFrame::PresenceChanged(p) => Some(p),
        _ => None,
    }
}

fn typing_and_presence_reach_only_who_sees_them(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "presence", &[]) else { return };
    let mut ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let mut eve = d.register(&unique("eve"));
    let room = ann.client.create_room("lobby").expect("create").room;
    bob.client.join_room(room).expect("join");

    // Typing: bob sees it, eve (no member) does not and may not type there; a second notice
    // within 3 s is swallowed.
    ann.client.typing(room).expect("typing");
    let t = next_push(&mut bob.client, Duration::from_secs(5), typing).expect("bob sees ann typing");
    assert_eq!((t.room, t.user.as_str()), (room, ann.name.as_str()));
    ann.client.typing(room).expect("typing again");
    assert!(next_push(&mut bob.client, Duration::from_millis(700), typing).is_none(), "throttled");
    assert!(next_push(&mut eve.client, Duration::from_millis(300), typing).is_none());
    assert_eq!(server_code("typing outside", eve.client.typing(room)), ErrorCode::NOT_MEMBER);

    // Presence: eve watches ann and bob; only watchers hear of changes.
    let ann_id = UserId(ann.user_id);
    let now = eve.client.watch_presence(vec![ann_id, UserId(bob.user_id), UserId(999_999)]).expect("watch");
    let statuses: Vec<PresenceStatus> = now.entries.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [PresenceStatus::ONLINE, PresenceStatus::ONLINE, PresenceStatus::OFFLINE]);
    let home = tempfile::tempdir().expect("home");
    let mut login = d.cli(home.path());
    login.args(["login", &ann.name]);
    cli_ok(login);
    let mut away = d.cli(home.path());
    away.args(["presence", "away"]);
    assert_eq!(cli_ok(away), [serde_json::json!({})]);
    let p = next_push(&mut eve.client, Duration::from_secs(5), presence).expect("eve hears ann is away");
    assert_eq!((p.user_id, p.status), (ann_id, PresenceStatus::AWAY));
    assert!(next_push(&mut bob.client, Duration::from_millis(300), presence).is_none(), "bob watches nobody");
    // `chime members` shows presence.
    let mut members = d.cli(home.path());
    members.args(["members", &room.to_string()]);
    let rows = cli_ok(members);
    let of =
        |name: &str| rows.iter().find(|r| json_str(r, "user") == name).map(|r| json_str(r, "presence").to_string());
    assert_eq!(of(&ann.name).as_deref(), Some("away"));
    assert_eq!(of(&bob.name).as_deref(), Some("online"));
    // ann's last connection goes: offline, with a last-seen time.
    drop(ann);
    let p = next_push(&mut eve.client, Duration::from_secs(5), presence).expect("eve hears ann left");
    assert_eq!((p.user_id, p.status), (ann_id, PresenceStatus::OFFLINE));
    assert!(p.last_seen_ms > 0);
    let mut typing_cli = d.cli(home.path());
    typing_cli.args(["typing", &RoomId(room.get()).to_string()]);
    cli_ok(typing_cli);
}

/// "Last seen" is durable: written when a user's last connection closes (the session's last use),
/// so after a restart `chime members` still shows when an offline member was last there.
fn last_seen_survives_a_restart(backend: Backend) {
    let Some(mut d) = Daemon::start_backend(backend, "last_seen", &[]) else { return };
    let mut ann = d.register(&unique("ann"));
    let bob = d.register(&unique("bob"));
    let ann_name = ann.name.clone();
    let room = ann.client.create_room("lobby").expect("create").room;
    let mut bob_client = bob.client;
    bob_client.join_room(room).expect("join");
    let before = chime_storage::now_ms();
    drop(bob_client);
    std::thread::sleep(Duration::from_millis(300));
    drop(ann);
    d.stop();
    d.restart();
    // The daemon has not seen bob since it started: what it answers comes from the store.
    let mut ann = d.user(&ann_name);
    let entries = ann.watch_presence(vec![UserId(bob.user_id)]).expect("watch").entries;
    assert_eq!(entries[0].status, PresenceStatus::OFFLINE);
    let seen = entries[0].last_seen_ms;
    assert!(seen >= before - 1_000 && seen <= before + 2_000, "last seen {seen}, disconnected at {before}");
    let home = tempfile::tempdir().expect("home");
    let mut login = d.cli(home.path());
    login.args(["login", &ann_name]);
    cli_ok(login);
    let mut members = d.cli(home.path());
    members.args(["members", &room.to_string()]);
    let rows = cli_ok(members);
    let bob_row = rows.iter().find(|r| json_str(r, "user") == bob.name).expect("bob listed");
    assert_eq!(json_str(bob_row, "presence"), "offline");
    assert!(is_rfc3339(json_str(bob_row, "last_seen")), "{bob_row}");
}
