//! Servers and channels through the real daemon and `chime server|servers|channel`: joining a
//! server gives its channels at once (no room rows per channel), a channel created while members
//! are online reaches them live, roles decide who reads and who posts, leaving stops the pushes.

use crate::util::*;
use chime_protocol::{CreateChannel, DeltaKind, ErrorCode, RoomId, ServerId};
use chime_tests::daemon::{Backend, Daemon};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

on_both_stores!(servers_give_their_channels_by_role);

fn cli(d: &Daemon, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = d.cli(home);
    cmd.args(args);
    cli_ok(cmd)
}

fn servers_give_their_channels_by_role(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "servers", &[]) else { return };
    let ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);
    let made = cli(&d, home.path(), &["server", "create", "rustaceans", "--description", "crabs"]);
    let server = json_u64(&made[0], "server");
    assert_eq!((json_str(&made[0], "role"), json_u64(&made[0], "members")), ("owner", 1));
    assert_eq!(made[0]["member_cap"], 1_000_000);
    let general = json_u64(&made[0]["channels"][0], "room");

    // bob joins with his live connection: the channels come with the answer and their pushes follow.
    let joined = bob.client.join_server(ServerId(server)).expect("join");
    assert_eq!((joined.members, joined.role.as_str()), (2, "member"));
    assert_eq!(joined.channels.iter().map(|c| c.room.get()).collect::<Vec<_>>(), [general]);
    cli(&d, home.path(), &["send", &general.to_string(), "welcome"]);
    let got = next_delta(&mut bob.client, general, Duration::from_secs(5));
    assert_eq!(got.text(), "welcome");

    // A channel everyone reads reaches bob live; a staff channel does not; a news channel is
    // read-only for members.
    let random = json_u64(&cli(&d, home.path(), &["channel", "create", &server.to_string(), "random"])[0], "room");
    let create = next_delta(&mut bob.client, random, Duration::from_secs(5));
    assert_eq!((create.seq.get(), create.kind()), (1, DeltaKind::CREATE));
    bob.client.post(RoomId(random), "b1", "hi all").expect("a member posts in a new channel");
    let staff = cli(&d, home.path(), &["channel", "create", &server.to_string(), "staff", "--read-roles", "moderator"]);
    let staff = json_u64(&staff[0], "room");
    let news = cli(&d, home.path(), &["channel", "create", &server.to_string(), "news", "--post-roles", "moderator"]);
    let news = json_u64(&news[0], "room");
    assert_eq!(server_code("post in staff", bob.client.post(RoomId(staff), "b2", "?")), ErrorCode::NOT_MEMBER);
    assert_eq!(server_code("read staff", bob.client.history(RoomId(staff), 0, 10)), ErrorCode::NOT_MEMBER);
    assert_eq!(server_code("post in news", bob.client.post(RoomId(news), "b3", "?")), ErrorCode::FORBIDDEN);
    assert_eq!(
        server_code(
            "a member creates a channel",
            bob.client.create_channel(CreateChannel {
                server: ServerId(server),
                name: "mine".into(),
                voice: false,
                read_roles: vec![],
                post_roles: vec![],
            })
        ),
        ErrorCode::FORBIDDEN
    );
    // As a moderator bob reads staff and posts news.
    let out = cli(&d, home.path(), &["server", "role", &server.to_string(), &bob.name, "moderator"]);
    assert_eq!(json_str(&out[0], "role"), "moderator");
    assert!(bob.client.history(RoomId(staff), 0, 10).is_ok());
    bob.client.post(RoomId(news), "b4", "announcement").expect("a moderator posts news");

    // `servers` lists; channels are among the rooms; a fresh login follows them.
    let listed = cli(&d, home.path(), &["servers"]);
    assert_eq!(listed.iter().map(|s| json_u64(s, "server")).collect::<Vec<_>>(), [server]);
    let mut again = d.resume(&bob.token);
    cli(&d, home.path(), &["send", &random.to_string(), "after the login"]);
    assert_eq!(next_delta(&mut again, random, Duration::from_secs(5)).text(), "after the login");
    let mut rooms = d.cli(home.path());
    rooms.arg("rooms");
    let rooms: Vec<u64> = cli_ok(rooms).iter().map(|r| json_u64(r, "room")).collect();
    for r in [general, random, staff, news] {
        assert!(rooms.contains(&r), "{r} missing from {rooms:?}");
    }

    // Leaving stops the pushes; a private server cannot be joined; channels cannot be joined as rooms.
    bob.client.leave_server(ServerId(server)).expect("leave");
    assert_eq!(server_code("post after leaving", bob.client.post(RoomId(general), "b5", "?")), ErrorCode::NOT_MEMBER);
    assert_eq!(server_code("join a channel as a room", bob.client.join_room(RoomId(general))), ErrorCode::FORBIDDEN);
    let private = cli(&d, home.path(), &["server", "create", "hidden", "--private"]);
    let private = json_u64(&private[0], "server");
    assert_eq!(server_code("join a private server", bob.client.join_server(ServerId(private))), ErrorCode::FORBIDDEN);
}
