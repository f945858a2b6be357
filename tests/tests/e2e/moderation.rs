//! Moderation through the real daemon and `chime room ...`: a private room is entered by invite
//! (the invitee's live connection is subscribed at once), a muted member cannot post, a kicked or
//! banned member stops receiving the room (after seeing why), roles are given and defined.

use crate::util::*;
use chime_protocol::{DeltaKind, ErrorCode, RoomId};
use chime_tests::daemon::{Backend, Daemon};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

on_both_stores!(moderators_invite_mute_kick_and_ban);

fn cli(d: &Daemon, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = d.cli(home);
    cmd.args(args);
    cli_ok(cmd)
}

fn moderators_invite_mute_kick_and_ban(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "moderation", &[]) else { return };
    let ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let mut cat = d.register(&unique("cat"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);
    let room = json_u64(&cli(&d, home.path(), &["room", "create", "club", "--private"])[0], "room");
    let r = room.to_string();
    assert_eq!(server_code("join a private room", bob.client.join_room(RoomId(room))), ErrorCode::FORBIDDEN);

    // Invited: bob's live connection is subscribed and sees his INVITE, then messages.
    let out = cli(&d, home.path(), &["room", "invite", &r, &bob.name]);
    assert_eq!((json_u64(&out[0], "room"), json_str(&out[0], "user")), (room, bob.name.as_str()));
    let invite = next_delta(&mut bob.client, room, Duration::from_secs(5));
    assert_eq!((invite.kind(), invite.text()), (DeltaKind::INVITE, bob.name.as_str()));
    bob.client.post(RoomId(room), "b1", "thanks").expect("a member posts");
    cli(&d, home.path(), &["room", "invite", &r, &cat.name]);

    // Roles: bob becomes a moderator and may now mute cat, but not ban.
    let out = cli(&d, home.path(), &["room", "role", &r, &bob.name, "moderator"]);
    assert_eq!(json_str(&out[0], "role"), "moderator");
    bob.client.moderate(RoomId(room), &cat.name, chime_protocol::ModAction::MUTE, "").expect("a moderator mutes");
    assert_eq!(server_code("a muted member posts", cat.client.post(RoomId(room), "c1", "hey")), ErrorCode::FORBIDDEN);
    assert_eq!(
        server_code(
            "a moderator bans",
            bob.client.moderate(RoomId(room), &cat.name, chime_protocol::ModAction::BAN, "")
        ),
        ErrorCode::FORBIDDEN
    );
    cli(&d, home.path(), &["room", "mute", &r, &cat.name, "--remove"]);
    cat.client.post(RoomId(room), "c2", "free again").expect("unmuted");

    // A role the room defines, and `member` redefined room-wide.
    let out = cli(&d, home.path(), &["room", "define-role", &r, "helper", "read", "post", "pin"]);
    assert_eq!(out[0]["permissions"], serde_json::json!(["read", "post", "pin"]));
    cli(&d, home.path(), &["room", "role", &r, &cat.name, "helper"]);

    // Kicked: cat sees the KICK, then nothing more from the room.
    cli(&d, home.path(), &["room", "kick", &r, &cat.name]);
    let pushes = pushes_until(&mut cat.client, room, head_seq(&mut bob.client, room), Duration::from_secs(5));
    assert_eq!(pushes.last().map(|d| d.kind()), Some(DeltaKind::KICK));
    bob.client.post(RoomId(room), "b2", "after the kick").expect("post");
    assert!(
        matches!(cat.client.recv(Some(Duration::from_millis(500))), Ok(None)),
        "a kicked member receives nothing more"
    );
    assert_eq!(server_code("a kicked member posts", cat.client.post(RoomId(room), "c3", "?")), ErrorCode::NOT_MEMBER);

    // Banned from a public room: cannot rejoin until unbanned.
    let lobby = json_u64(&cli(&d, home.path(), &["room", "create", "lobby"])[0], "room");
    cat.client.join_room(RoomId(lobby)).expect("join the public room");
    cli(&d, home.path(), &["room", "ban", &lobby.to_string(), &cat.name]);
    assert_eq!(server_code("rejoin while banned", cat.client.join_room(RoomId(lobby))), ErrorCode::FORBIDDEN);
    cli(&d, home.path(), &["room", "ban", &lobby.to_string(), &cat.name, "--remove"]);
    cat.client.join_room(RoomId(lobby)).expect("rejoin after the ban is lifted");

    // The log tells the whole story.
    let kinds: Vec<DeltaKind> = history_all(&mut bob.client, room).iter().map(|d| d.kind()).collect();
    for k in [
        DeltaKind::INVITE,
        DeltaKind::ROLE,
        DeltaKind::MUTE,
        DeltaKind::UNMUTE,
        DeltaKind::ROLE_DEFINED,
        DeltaKind::KICK,
    ] {
        assert!(kinds.contains(&k), "{k:?} missing from {kinds:?}");
    }
}
