//! Protocol version 3 through the real daemon: the handshake's version range and its refusals,
//! a second HELLO and request id 0, the limits in WELCOME, WHOAMI and GET_ROOM (with `chime
//! whoami` and `chime room info`), and SYNC or HISTORY from a cursor past the room's head.

use crate::util::*;
use chime_protocol::{
    ClientFrame, ErrorCode, FrameType, Hello, RoomCursor, RoomId, Seq, ServerFrame, Sync, MAGIC, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use chime_tests::daemon::{Daemon, DaemonOptions};
use std::time::Duration;

fn daemon() -> Daemon {
    Daemon::start(DaemonOptions::default())
}

fn hello(min_version: u16, max_version: u16) -> ClientFrame {
    ClientFrame::Hello(Hello {
        magic: MAGIC,
        max_version,
        min_version,
        client_name: "wire-test".into(),
        client_version: "0".into(),
    })
}

/// The ERROR and GOODBYE a refused first frame gets, then the close.
fn refused_at_handshake(d: &Daemon, bytes: &[u8]) -> (ErrorCode, String) {
    let mut c = RawConn::connect(d.plaintext_addr());
    c.write(bytes).expect("write");
    let frames = c.until_closed(Duration::from_secs(5));
    let [error, goodbye] = &frames[..] else { panic!("expected ERROR then GOODBYE, got {frames:?}") };
    let Ok(ServerFrame::Error(e)) = ServerFrame::decode(error) else { panic!("{error:?}") };
    assert_eq!(error_code(goodbye), Some(e.code), "GOODBYE gives the same reason");
    (e.code, e.message)
}

#[test]
fn the_handshake_negotiates_a_version_and_announces_the_limits() {
    let d = daemon();
    let mut c = RawConn::connect(d.plaintext_addr());
    // A client that also speaks versions from the future gets the newest the server speaks.
    c.send(&hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 7), 1);
    let Got::Frame(f) = c.recv(Duration::from_secs(5)) else { panic!("no WELCOME") };
    let Ok(ServerFrame::Welcome(w)) = ServerFrame::decode(&f) else { panic!("{f:?}") };
    assert_eq!(w.protocol_version, PROTOCOL_VERSION);
    assert_eq!((w.min_version, w.max_version), (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION));
    assert_eq!(w.limits.max_frame, 1_048_576);
    assert_eq!((w.limits.max_text, w.limits.default_page, w.limits.max_page), (16 * 1024, 500, 1000));
    assert_eq!(w.limits.max_in_flight, 256);
    assert!(w.limits.heartbeat_secs > 0);
}

#[test]
fn refusals_before_the_handshake_say_why() {
    let d = daemon();
    // A version-2 client: magic, version 2, then its name and version strings.
    let mut v2 = b"CHIM".to_vec();
    v2.extend_from_slice(&[2, 5, b'c', b'h', b'i', b'm', b'e', 1, b'1']);
    let frame = |ty: FrameType, rid: u32, body: &[u8]| {
        let mut out = ((body.len() + 6) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&ty.0.to_be_bytes());
        out.extend_from_slice(&rid.to_be_bytes());
        out.extend_from_slice(body);
        out
    };
    let (code, message) = refused_at_handshake(&d, &frame(FrameType::HELLO, 1, &v2));
    assert_eq!(code, ErrorCode::VERSION_UNSUPPORTED);
    assert!(message.contains("up to 2") && message.contains("3 to 3"), "{message}");

    let future = hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2).encode(1).expect("small");
    assert_eq!(refused_at_handshake(&d, &future).0, ErrorCode::VERSION_UNSUPPORTED);

    let http = frame(FrameType::HELLO, 1, b"GET / HTTP/1.1");
    let (code, message) = refused_at_handshake(&d, &http);
    assert_eq!(code, ErrorCode::HANDSHAKE_REQUIRED);
    assert!(message.contains("not a Chime client"), "{message}");
    assert!(!message.contains("version"), "{message}");

    let mut broken = b"CHIM".to_vec();
    broken.extend_from_slice(&[3, 3, 40, b'x']);
    assert_eq!(refused_at_handshake(&d, &frame(FrameType::HELLO, 1, &broken)).0, ErrorCode::BAD_FRAME);

    let zero = hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION).encode(0).expect("small");
    assert_eq!(refused_at_handshake(&d, &zero).0, ErrorCode::BAD_FRAME);

    let ping = ClientFrame::Ping(chime_protocol::Ping { nonce: 1 }).encode(3).expect("small");
    assert_eq!(refused_at_handshake(&d, &ping).0, ErrorCode::HANDSHAKE_REQUIRED);
}

#[test]
fn a_second_hello_and_request_id_0_are_refused_and_the_connection_goes_on() {
    let d = daemon();
    let mut c = RawConn::connect(d.plaintext_addr());
    c.handshake();
    c.send(&hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), 2);
    let Got::Frame(f) = c.recv(Duration::from_secs(5)) else { panic!("no answer") };
    assert_eq!((f.request_id, error_code(&f)), (2, Some(ErrorCode::HANDSHAKE_COMPLETE)));
    c.send(&ClientFrame::Ping(chime_protocol::Ping { nonce: 5 }), 0);
    let Got::Frame(f) = c.recv(Duration::from_secs(5)) else { panic!("no answer") };
    assert_eq!((f.request_id, error_code(&f)), (0, Some(ErrorCode::BAD_FRAME)));
    c.send(&ClientFrame::Ping(chime_protocol::Ping { nonce: 6 }), 3);
    let Got::Frame(f) = c.recv(Duration::from_secs(5)) else { panic!("no answer") };
    assert!(matches!(ServerFrame::decode(&f), Ok(ServerFrame::Pong(p)) if p.nonce == 6 && f.request_id == 3));
}

#[test]
fn whoami_and_get_room_answer_through_the_library_and_the_cli() {
    let d = daemon();
    let mut ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let me = ann.client.whoami().expect("WHOAMI");
    assert_eq!((me.user.as_str(), me.user_id.get()), (ann.name.as_str(), ann.user_id));
    let room = ann.client.create_room("lobby").expect("create").room;
    bob.client.join_room(room).expect("join");
    ann.client.post(room, &chime_client::new_idempotency_key(), "hi").expect("post");
    let details = ann.client.get_room(room).expect("GET_ROOM");
    assert_eq!((details.info.name.as_str(), details.members, details.role.as_str()), ("lobby", 2, "owner"));
    assert_eq!(details.info.head_seq, Seq(3), "CREATE, JOIN, the message");
    bob.client.leave_room(room).expect("leave");
    assert_eq!(ann.client.get_room(room).expect("GET_ROOM").members, 1, "the count follows leaves");
    assert_eq!(server_code("a former member", bob.client.get_room(room)), ErrorCode::NOT_MEMBER);
    assert_eq!(server_code("no such room", ann.client.get_room(RoomId(room.get() + 1000))), ErrorCode::NOT_FOUND);

    // The CLI, on the same account (logged in with the password).
    let home = tempfile::tempdir().expect("home");
    let mut login = d.cli(home.path());
    login.args(["login", &ann.name]);
    cli_ok(login);
    let mut whoami = d.cli(home.path());
    whoami.arg("whoami");
    let out = cli_ok(whoami);
    assert_eq!((json_str(&out[0], "user"), json_u64(&out[0], "user_id")), (ann.name.as_str(), ann.user_id));
    let mut info = d.cli(home.path());
    info.args(["room", "info", &room.to_string()]);
    let out = cli_ok(info);
    assert_eq!(json_u64(&out[0], "room"), room.get());
    assert_eq!((json_str(&out[0], "name"), json_str(&out[0], "kind")), ("lobby", "group"));
    assert_eq!((json_u64(&out[0], "head"), json_u64(&out[0], "members")), (4, 1), "the LEAVE is seq 4");
}

#[test]
fn a_cursor_past_the_head_is_refused_naming_the_head() {
    let d = daemon();
    let mut ann = d.register(&unique("ann"));
    let room = ann.client.create_room("r").expect("create").room;
    let other = ann.client.create_room("s").expect("create").room;
    ann.client.post(room, &chime_client::new_idempotency_key(), "one").expect("post");
    // HISTORY past the head; at the head is fine (empty).
    let past = ann.client.history(room, 9, 10);
    assert_eq!(server_code("HISTORY past the head", past), ErrorCode::CURSOR_AHEAD);
    assert!(ann.client.history(room, 2, 10).expect("at the head").deltas.is_empty());

    // SYNC of two rooms, one from a cursor past its head: the SYNC ends with CURSOR_AHEAD, the other
    // room goes on as pushes, and the refused room is live (a new post reaches the client).
    let sync = ClientFrame::Sync(Sync {
        rooms: vec![RoomCursor { room, seq: Seq(50) }, RoomCursor { room: other, seq: Seq(0) }],
        page_size: 10,
    });
    let id = ann.client.send(&sync).expect("send SYNC");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let error = loop {
        assert!(std::time::Instant::now() < deadline, "no answer to the SYNC");
        match ann.client.recv(Some(Duration::from_secs(1))).expect("recv") {
            Some((rid, ServerFrame::Error(e))) if rid == id => break e,
            Some((rid, ServerFrame::SyncDone(done))) if rid == id => panic!("SYNC_DONE despite a bad cursor: {done:?}"),
            _ => {}
        }
    };
    assert_eq!(error.code, ErrorCode::CURSOR_AHEAD);
    assert!(error.message.contains("head 2"), "{}", error.message);
    let posted = ann.client.post(room, &chime_client::new_idempotency_key(), "two").expect("post");
    let got = next_delta(&mut ann.client, room, Duration::from_secs(5));
    assert_eq!((got.seq, got.text()), (posted.seq, "two"));
}
