//! Direct dialogs through the real daemon and `chime dm`: one room per pair whichever side asks,
//! both sides' live connections subscribed at once, nobody else can join, neither side can leave.

use crate::util::*;
use chime_protocol::{ErrorCode, RoomKind};
use chime_tests::daemon::{Backend, Daemon};
use std::time::Duration;

on_both_stores!(a_direct_dialog_is_one_room_per_pair);

fn a_direct_dialog_is_one_room_per_pair(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "direct", &[]) else { return };
    let ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let mut eve = d.register(&unique("eve"));
    let home = tempfile::tempdir().expect("home");
    let mut login = d.cli(home.path());
    login.args(["login", &ann.name]);
    cli_ok(login);
    let mut dm = d.cli(home.path());
    dm.args(["dm", &bob.name]);
    let out = cli_ok(dm);
    let room = json_u64(&out[0], "room");
    // bob was online: his connection is subscribed already and sees the CREATE, then messages.
    assert_eq!(next_delta(&mut bob.client, room, Duration::from_secs(5)).seq, 1);
    let mut send = d.cli(home.path());
    send.args(["send", &room.to_string(), "psst"]);
    cli_ok(send);
    let got = next_delta(&mut bob.client, room, Duration::from_secs(5));
    assert_eq!((got.seq.get(), got.text()), (2, "psst"));
    // bob asking gets the same room.
    let info = bob.client.open_direct(&ann.name).expect("open from the other side");
    assert_eq!((info.room.get(), info.kind), (room, RoomKind::DIRECT));
    let mut again = d.cli(home.path());
    again.args(["dm", &bob.name]);
    assert_eq!(json_u64(&cli_ok(again)[0], "room"), room);
    // Nobody else gets in; neither side gets out; nobody talks to themselves or to nobody.
    assert_eq!(server_code("a third joins", eve.client.join_room(info.room)), ErrorCode::FORBIDDEN);
    assert_eq!(server_code("a side leaves", bob.client.leave_room(info.room)), ErrorCode::FORBIDDEN);
    assert_eq!(server_code("a stranger posts", eve.client.post(info.room, "k", "hi")), ErrorCode::NOT_MEMBER);
    assert_eq!(server_code("no such user", eve.client.open_direct("nobody-at-all")), ErrorCode::NOT_FOUND);
    assert_eq!(server_code("oneself", eve.client.open_direct(&eve.name)), ErrorCode::INVALID_ARGUMENT);
    // It is listed among both sides' rooms.
    let mut rooms = d.cli(home.path());
    rooms.arg("rooms");
    assert!(cli_ok(rooms).iter().any(|r| json_u64(r, "room") == room));
}
