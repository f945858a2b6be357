//! Golden vectors: one frame of every type, as bytes in `tests/vectors/*.hex`, checked both ways
//! (the value encodes to exactly those bytes; those bytes decode to exactly that value). They pin
//! the wire format so an innocent-looking change to a body struct cannot slip through, and give
//! implementers in other languages something to test against.
//!
//! `CHIME_BLESS=1 cargo test -p chime-protocol --test vectors` rewrites the files from the values
//! below; only do that for a deliberate protocol change, and check the result against
//! `docs/protocol.md` by hand.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use chime_protocol::*;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Either direction's frame, so both tables share one checker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AnyFrame {
    Client(ClientFrame),
    Server(ServerFrame),
}

impl AnyFrame {
    fn frame_type(&self) -> FrameType {
        match self {
            AnyFrame::Client(f) => f.frame_type(),
            AnyFrame::Server(f) => f.frame_type(),
        }
    }

    fn encode(&self, id: u32) -> Vec<u8> {
        match self {
            AnyFrame::Client(f) => f.encode(id).unwrap().to_vec(),
            AnyFrame::Server(f) => f.encode(id).unwrap().to_vec(),
        }
    }

    fn decode_like(&self, raw: &RawFrame) -> Result<AnyFrame, DecodeError> {
        match self {
            AnyFrame::Client(_) => ClientFrame::decode(raw).map(AnyFrame::Client),
            AnyFrame::Server(_) => ServerFrame::decode(raw).map(AnyFrame::Server),
        }
    }
}

/// One golden vector: a file stem, a description of the values, the request id and the frame.
struct Vector {
    file: &'static str,
    about: &'static str,
    id: u32,
    frame: AnyFrame,
}

fn c(file: &'static str, about: &'static str, id: u32, f: ClientFrame) -> Vector {
    Vector { file, about, id, frame: AnyFrame::Client(f) }
}

fn s(file: &'static str, about: &'static str, id: u32, f: ServerFrame) -> Vector {
    Vector { file, about, id, frame: AnyFrame::Server(f) }
}

fn delta(seq: u64, body: DeltaBody) -> Delta {
    Delta {
        room: RoomId(300),
        seq: Seq(seq),
        author_id: UserId(7),
        author: "ann".into(),
        ts_ms: 1_700_000_000_000,
        body,
    }
}

fn limits() -> Limits {
    Limits {
        max_frame: 1_048_576,
        heartbeat_secs: 30,
        max_text: 16_384,
        max_key: 64,
        max_room_name: 100,
        max_user_name: 32,
        min_password: 8,
        max_password: 1024,
        max_in_flight: 256,
        max_queued_during_login: 64,
        default_page: 500,
        max_page: 1000,
        max_sync_rooms: 1000,
    }
}

fn vectors() -> Vec<Vector> {
    let key = "0123456789abcdef0123456789abcdef";
    vec![
        c(
            "hello",
            "HELLO id=1 magic=\"CHIM\" max_version=3 min_version=3 client_name=\"chime\" client_version=\"0.1.0\"",
            1,
            ClientFrame::Hello(Hello {
                magic: MAGIC,
                max_version: 3,
                min_version: 3,
                client_name: "chime".into(),
                client_version: "0.1.0".into(),
            }),
        ),
        c("ping", "PING id=5 nonce=1", 5, ClientFrame::Ping(Ping { nonce: 1 })),
        c("pong", "PONG id=0 nonce=1000 (answer to a server PING)", 0, ClientFrame::Pong(Ping { nonce: 1000 })),
        c(
            "register",
            "REGISTER id=2 user=\"ann\" password=\"pw\" user_agent=\"chime/0.1.0\"",
            2,
            ClientFrame::Register(Credentials { user: "ann".into(), password: "pw".into(), user_agent: "chime/0.1.0".into() }),
        ),
        c(
            "login",
            "LOGIN id=2 user=\"ann\" password=\"pw\" user_agent=\"\"",
            2,
            ClientFrame::Login(Credentials { user: "ann".into(), password: "pw".into(), user_agent: String::new() }),
        ),
        c(
            "resume",
            "RESUME id=2 token=\"tok\" user_agent=\"cli\"",
            2,
            ClientFrame::Resume(Resume { token: "tok".into(), user_agent: "cli".into() }),
        ),
        c("logout", "LOGOUT id=9 (empty body)", 9, ClientFrame::Logout(Empty {})),
        c(
            "create_room",
            "CREATE_ROOM id=3 name=\"general\" kind=GROUP(1)",
            3,
            ClientFrame::CreateRoom(CreateRoom { name: "general".into(), kind: RoomKind::GROUP }),
        ),
        c("join_room", "JOIN_ROOM id=4 room=300", 4, ClientFrame::JoinRoom(RoomRef { room: RoomId(300) })),
        c("leave_room", "LEAVE_ROOM id=4 room=300", 4, ClientFrame::LeaveRoom(RoomRef { room: RoomId(300) })),
        c("get_room", "GET_ROOM id=12 room=300", 12, ClientFrame::GetRoom(RoomRef { room: RoomId(300) })),
        c("whoami", "WHOAMI id=13 (empty body)", 13, ClientFrame::Whoami(Empty {})),
        c(
            "list_rooms",
            "LIST_ROOMS id=6 after_room=300 limit=500",
            6,
            ClientFrame::ListRooms(ListRooms { after_room: RoomId(300), limit: 500 }),
        ),
        c(
            "list_sessions",
            "LIST_SESSIONS id=10 after_session=0 limit=0 (the server's default page)",
            10,
            ClientFrame::ListSessions(ListSessions { after_session: 0, limit: 0 }),
        ),
        c(
            "revoke_sessions",
            "REVOKE_SESSIONS id=11 session=Some(12)",
            11,
            ClientFrame::RevokeSessions(RevokeSessions { session: Some(12) }),
        ),
        c(
            "revoke_all_sessions",
            "REVOKE_SESSIONS id=11 session=None (every session of the user)",
            11,
            ClientFrame::RevokeSessions(RevokeSessions { session: None }),
        ),
        c(
            "list_members",
            "LIST_MEMBERS id=7 room=300 after_user=128 limit=500",
            7,
            ClientFrame::ListMembers(ListMembers { room: RoomId(300), after_user: UserId(128), limit: 500 }),
        ),
        c(
            "post",
            "POST id=2 room=300 idempotency_key=\"0123456789abcdef0123456789abcdef\" text=\"h\u{e9}llo\" (e-acute is 2 UTF-8 bytes)",
            2,
            ClientFrame::Post(Post { room: RoomId(300), idempotency_key: key.into(), text: "h\u{e9}llo".into() }),
        ),
        c(
            "sync",
            "SYNC id=8 rooms=[{room=300 seq=0},{room=1 seq=70000}] page_size=256",
            8,
            ClientFrame::Sync(Sync {
                rooms: vec![
                    RoomCursor { room: RoomId(300), seq: Seq(0) },
                    RoomCursor { room: RoomId(1), seq: Seq(70_000) },
                ],
                page_size: 256,
            }),
        ),
        c(
            "history",
            "HISTORY id=10 room=300 after=0 limit=100",
            10,
            ClientFrame::History(History { room: RoomId(300), after: Seq(0), limit: 100 }),
        ),
        s(
            "welcome",
            "WELCOME id=1 protocol_version=3 min_version=3 max_version=3 server_name=\"chimed\" server_version=\"0.1.0\" limits={max_frame=1048576 heartbeat_secs=30 max_text=16384 max_key=64 max_room_name=100 max_user_name=32 min_password=8 max_password=1024 max_in_flight=256 max_queued_during_login=64 default_page=500 max_page=1000 max_sync_rooms=1000}",
            1,
            ServerFrame::Welcome(Welcome {
                protocol_version: 3,
                min_version: 3,
                max_version: 3,
                server_name: "chimed".into(),
                server_version: "0.1.0".into(),
                limits: limits(),
            }),
        ),
        s("server_ping", "SERVER_PING id=0 nonce=1000", 0, ServerFrame::Ping(Ping { nonce: 1000 })),
        s("server_pong", "SERVER_PONG id=5 nonce=1", 5, ServerFrame::Pong(Ping { nonce: 1 })),
        s(
            "error",
            "ERROR id=4 code=NOT_FOUND(9) message=\"no such room\" retryable=false",
            4,
            ServerFrame::Error(ErrorBody { code: ErrorCode::NOT_FOUND, message: "no such room".into(), retryable: false }),
        ),
        s(
            "authed",
            "AUTHED id=2 user_id=7 user=\"ann\" token=Some(\"tok\")",
            2,
            ServerFrame::Authed(Authed { user_id: UserId(7), user: "ann".into(), token: Some("tok".into()) }),
        ),
        s("done", "DONE id=9 (empty body)", 9, ServerFrame::Done(Empty {})),
        s(
            "identity",
            "IDENTITY id=13 user_id=7 user=\"ann\" session=12",
            13,
            ServerFrame::Identity(Identity { user_id: UserId(7), user: "ann".into(), session: 12 }),
        ),
        s(
            "room_details",
            "ROOM_DETAILS id=12 info={room=300 name=\"general\" kind=GROUP(1) head_seq=2} members=2 role=\"owner\"",
            12,
            ServerFrame::RoomDetails(RoomDetails {
                info: RoomInfo { room: RoomId(300), name: "general".into(), kind: RoomKind::GROUP, head_seq: Seq(2) },
                members: 2,
                role: "owner".into(),
            }),
        ),
        s(
            "room_info",
            "ROOM_INFO id=3 room=300 name=\"general\" kind=GROUP(1) head_seq=1",
            3,
            ServerFrame::RoomInfo(RoomInfo {
                room: RoomId(300),
                name: "general".into(),
                kind: RoomKind::GROUP,
                head_seq: Seq(1),
            }),
        ),
        s(
            "room_list",
            "ROOM_LIST id=6 rooms=[{room=300 name=\"general\" kind=GROUP head_seq=2},{room=301 name=\"x\" kind=GROUP head_seq=1}] next_after=Some(301)",
            6,
            ServerFrame::RoomList(RoomList {
                rooms: vec![
                    RoomInfo { room: RoomId(300), name: "general".into(), kind: RoomKind::GROUP, head_seq: Seq(2) },
                    RoomInfo { room: RoomId(301), name: "x".into(), kind: RoomKind::GROUP, head_seq: Seq(1) },
                ],
                next_after: Some(RoomId(301)),
            }),
        ),
        s(
            "session_list",
            "SESSION_LIST id=10 sessions=[{session=12 ip=\"127.0.0.1\" user_agent=\"chime/0.1.0\" created_ms=1700000000000 last_seen_ms=1700000001000 current=true}] next_after=None",
            10,
            ServerFrame::SessionList(SessionList {
                sessions: vec![SessionInfo {
                    session: 12,
                    ip: "127.0.0.1".into(),
                    user_agent: "chime/0.1.0".into(),
                    created_ms: 1_700_000_000_000,
                    last_seen_ms: 1_700_000_001_000,
                    current: true,
                }],
                next_after: None,
            }),
        ),
        s("sessions_revoked", "SESSIONS_REVOKED id=11 count=1", 11, ServerFrame::SessionsRevoked(SessionsRevoked { count: 1 })),
        s(
            "member_list",
            "MEMBER_LIST id=7 room=300 members=[{user_id=7 user=\"ann\" role=\"owner\"}] next_after=None",
            7,
            ServerFrame::MemberList(MemberList {
                room: RoomId(300),
                members: vec![MemberInfo { user_id: UserId(7), user: "ann".into(), role: "owner".into() }],
                next_after: None,
            }),
        ),
        s(
            "posted",
            "POSTED id=2 room=300 seq=2 ts_ms=1700000000000 duplicate=false",
            2,
            ServerFrame::Posted(Posted { room: RoomId(300), seq: Seq(2), ts_ms: 1_700_000_000_000, duplicate: false }),
        ),
        s(
            "delta_page",
            "DELTA_PAGE id=8 room=300 deltas=[{seq=1 CREATE name=\"general\"},{seq=2 MESSAGE text=\"hi\"}] (author_id=7 author=\"ann\" ts_ms=1700000000000) more=true resume_after=2",
            8,
            ServerFrame::DeltaPage(DeltaPage {
                room: RoomId(300),
                deltas: vec![
                    delta(1, DeltaBody::Create(CreateBody { name: "general".into() })),
                    delta(2, DeltaBody::message("hi")),
                ],
                more: true,
                resume_after: Seq(2),
            }),
        ),
        s(
            "sync_done",
            "SYNC_DONE id=8 heads=[{room=300 seq=2}]",
            8,
            ServerFrame::SyncDone(SyncDone { heads: vec![RoomCursor { room: RoomId(300), seq: Seq(2) }] }),
        ),
        s(
            "delta",
            "DELTA (push) id=0 room=300 seq=3 author_id=7 author=\"ann\" ts_ms=-1 body=JOIN(3) with an empty payload",
            0,
            ServerFrame::Delta(Delta {
                room: RoomId(300),
                seq: Seq(3),
                author_id: UserId(7),
                author: "ann".into(),
                ts_ms: -1,
                body: DeltaBody::Join,
            }),
        ),
        s(
            "delta_message",
            "DELTA (push) id=0 room=300 seq=4 author_id=7 author=\"ann\" ts_ms=1700000000000 body=MESSAGE(2) text=\"hi\"",
            0,
            ServerFrame::Delta(delta(4, DeltaBody::message("hi"))),
        ),
        s(
            "delta_unknown_kind",
            "DELTA (push) id=0 room=300 seq=5 author_id=7 author=\"ann\" ts_ms=1700000000000 body=kind 0x7abc (unknown) payload=[01 02 03]: a client that does not know the kind skips it and still advances its cursor to 5",
            0,
            ServerFrame::Delta(delta(5, DeltaBody::Unknown { kind: DeltaKind(0x7abc), payload: vec![1, 2, 3] })),
        ),
        c(
            "open_direct",
            "OPEN_DIRECT id=15 user=\"bob\"",
            15,
            ClientFrame::OpenDirect(OpenDirect { user: "bob".into() }),
        ),
        c(
            "edit",
            "EDIT id=9 room=300 target=4 idempotency_key=\"k2\" text=\"hi!\"",
            9,
            ClientFrame::Edit(Edit { room: RoomId(300), target: Seq(4), idempotency_key: "k2".into(), text: "hi!".into() }),
        ),
        c(
            "delete",
            "DELETE id=10 room=300 target=4",
            10,
            ClientFrame::Delete(DeleteMessage { room: RoomId(300), target: Seq(4) }),
        ),
        c(
            "react",
            "REACT id=11 room=300 target=4 emoji=\"\u{1f44d}\" remove=false",
            11,
            ClientFrame::React(React { room: RoomId(300), target: Seq(4), emoji: "\u{1f44d}".into(), remove: false }),
        ),
        c(
            "reply",
            "REPLY id=12 room=300 reply_to=4 idempotency_key=\"k3\" text=\"yes\"",
            12,
            ClientFrame::Reply(Reply {
                room: RoomId(300),
                reply_to: Seq(4),
                idempotency_key: "k3".into(),
                text: "yes".into(),
            }),
        ),
        c(
            "pin",
            "PIN id=13 room=300 target=4 remove=true",
            13,
            ClientFrame::Pin(Pin { room: RoomId(300), target: Seq(4), remove: true }),
        ),
        c("view", "VIEW id=14 room=300 before=0 limit=50", 14, ClientFrame::View(View { room: RoomId(300), before: Seq(0), limit: 50 })),
        s(
            "message_page",
            "MESSAGE_PAGE id=14 room=300 messages=[{seq=4 author_id=7 author=\"ann\" ts_ms=1700000000000 text=\"hi!\" edited_ms=1700000000500 deleted=false reply_to=None pinned=true reactions=[{emoji=\"\u{1f44d}\" count=2 mine=true}]}] next_before=4",
            14,
            ServerFrame::MessagePage(MessagePage {
                room: RoomId(300),
                messages: vec![MessageView {
                    seq: Seq(4),
                    author_id: UserId(7),
                    author: "ann".into(),
                    ts_ms: 1_700_000_000_000,
                    text: Some("hi!".into()),
                    edited_ms: Some(1_700_000_000_500),
                    deleted: false,
                    reply_to: None,
                    pinned: true,
                    reactions: vec![ReactionCount { emoji: "\u{1f44d}".into(), count: 2, mine: true }],
                }],
                next_before: Some(Seq(4)),
            }),
        ),
        c(
            "restore",
            "RESTORE id=16 room=300 order=NEWEST_FIRST(1) cursor=0 limit=1000",
            16,
            ClientFrame::Restore(Restore { room: RoomId(300), order: RestoreOrder::NEWEST_FIRST, cursor: Seq(0), limit: 1000 }),
        ),
        s(
            "restore_page",
            "RESTORE_PAGE id=16 room=300 order=NEWEST_FIRST(1) head=5 deltas=[seq 5 LEAVE, seq 4 MESSAGE \"hi\"] next=4",
            16,
            ServerFrame::RestorePage(RestorePage {
                room: RoomId(300),
                order: RestoreOrder::NEWEST_FIRST,
                head: Seq(5),
                deltas: vec![delta(5, DeltaBody::Leave), delta(4, DeltaBody::message("hi"))],
                next: Some(Seq(4)),
            }),
        ),
        c(
            "search",
            "SEARCH id=17 room=300 query=\"hi there\" before=0 limit=50 (answered by MESSAGE_PAGE)",
            17,
            ClientFrame::Search(Search { room: RoomId(300), query: "hi there".into(), before: Seq(0), limit: 50 }),
        ),
        s(
            "error_retry_after",
            "ERROR id=16 code=RATE_LIMITED(12) message=\"at most 200 RESTORE pages per second (retry_after_ms=5)\" retryable=true",
            16,
            ServerFrame::Error(ErrorBody::rate_limited("at most 200 RESTORE pages per second", 5)),
        ),
        s(
            "delta_edit",
            "DELTA (push) id=0 room=300 seq=6 author_id=7 author=\"ann\" ts_ms=1700000000000 body=EDIT(5) target=4 text=\"hi!\"",
            0,
            ServerFrame::Delta(delta(6, DeltaBody::Edit(EditBody { target: Seq(4), text: "hi!".into() }))),
        ),
        s(
            "delta_delete",
            "DELTA (push) id=0 room=300 seq=7 author_id=7 author=\"ann\" ts_ms=1700000000000 body=DELETE(6) target=4",
            0,
            ServerFrame::Delta(delta(7, DeltaBody::Delete(TargetBody { target: Seq(4) }))),
        ),
        s(
            "delta_react",
            "DELTA (push) id=0 room=300 seq=8 author_id=7 author=\"ann\" ts_ms=1700000000000 body=REACT(7) target=4 emoji=\"\u{1f44d}\" (UNREACT(8) has the same payload)",
            0,
            ServerFrame::Delta(delta(8, DeltaBody::React(ReactBody { target: Seq(4), emoji: "\u{1f44d}".into() }))),
        ),
        s(
            "delta_reply",
            "DELTA (push) id=0 room=300 seq=9 author_id=7 author=\"ann\" ts_ms=1700000000000 body=REPLY(9) reply_to=4 text=\"yes\"",
            0,
            ServerFrame::Delta(delta(9, DeltaBody::Reply(ReplyBody { reply_to: Seq(4), text: "yes".into() }))),
        ),
        s(
            "delta_pin",
            "DELTA (push) id=0 room=300 seq=10 author_id=7 author=\"ann\" ts_ms=1700000000000 body=PIN(10) target=4 (UNPIN(11) has the same payload)",
            0,
            ServerFrame::Delta(delta(10, DeltaBody::Pin(TargetBody { target: Seq(4) }))),
        ),
        s(
            "goodbye",
            "GOODBYE (push) id=0 code=RESYNC_REQUIRED(15) message=\"slow\" resync=true",
            0,
            ServerFrame::Goodbye(Goodbye { code: ErrorCode::RESYNC_REQUIRED, message: "slow".into(), resync: true }),
        ),
    ]
}

fn vector_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("vectors")
}

/// The file text: comment lines, then the 10-byte header on one line and the body 16 bytes a line.
fn render(v: &Vector, bytes: &[u8]) -> String {
    let hex_line = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ");
    let mut out = String::new();
    writeln!(out, "# {}", v.about).unwrap();
    writeln!(
        out,
        "# type={} ({:#06x}); header: length(4) type(2) request_id(4), then body",
        v.frame.frame_type(),
        v.frame.frame_type().0
    )
    .unwrap();
    writeln!(out, "{}  {}  {}", hex_line(&bytes[..4]), hex_line(&bytes[4..6]), hex_line(&bytes[6..10])).unwrap();
    for row in bytes[HEADER_LEN..].chunks(16) {
        writeln!(out, "{}", hex_line(row)).unwrap();
    }
    out
}

/// Bytes from a vector file: `#` lines are comments, whitespace is ignored.
fn parse(text: &str) -> Vec<u8> {
    let digits: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.chars())
        .filter(|ch| !ch.is_whitespace())
        .collect();
    hex::decode(digits).unwrap()
}

#[test]
fn golden_vectors() {
    let dir = vector_dir();
    let bless = std::env::var_os("CHIME_BLESS").is_some_and(|v| v == "1");
    if bless {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for v in vectors() {
        let encoded = v.frame.encode(v.id);
        let path = dir.join(format!("{}.hex", v.file));
        if bless {
            std::fs::write(&path, render(&v, &encoded)).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.starts_with('#'), "{}: no comment header", path.display());
        let golden = parse(&text);
        assert_eq!(encoded, golden, "{}: encoding differs from the golden bytes", v.file);

        let mut buf = BytesMut::from(&golden[..]);
        let raw = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty(), "{}: bytes left after the frame", v.file);
        assert_eq!((raw.ty, raw.request_id), (v.frame.frame_type(), v.id), "{}", v.file);
        assert_eq!(v.frame.decode_like(&raw).unwrap(), v.frame, "{}: decoded value differs", v.file);
    }
}

#[test]
fn every_frame_type_has_a_vector() {
    let known: BTreeSet<u16> = (0..=u16::MAX).filter(|&code| FrameType(code).name().is_some()).collect();
    let covered: BTreeSet<u16> = vectors().iter().map(|v| v.frame.frame_type().0).collect();
    assert_eq!(known, covered);
    let files: BTreeSet<&str> = vectors().iter().map(|v| v.file).collect();
    assert_eq!(files.len(), vectors().len(), "file names must be distinct");
    for name in files {
        assert!(vector_dir().join(format!("{name}.hex")).is_file(), "{name}.hex missing");
    }
}

/// The hex bytes at the start of each line of the ```text blocks that follow `marker` in
/// docs/protocol.md (annotations after the bytes are skipped).
fn doc_blocks(doc: &str, marker: &str, count: usize) -> Vec<Vec<u8>> {
    let from = doc.find(marker).unwrap_or_else(|| panic!("docs/protocol.md lacks {marker:?}"));
    let mut blocks = Vec::new();
    let mut rest = &doc[from..];
    for _ in 0..count {
        let open = rest.find("```text\n").unwrap() + "```text\n".len();
        let close = open + rest[open..].find("```").unwrap();
        let mut bytes = Vec::new();
        for line in rest[open..close].lines() {
            let is_byte = |t: &&str| t.len() == 2 && t.chars().all(|ch| ch.is_ascii_hexdigit());
            for tok in line.split_whitespace().take_while(is_byte) {
                bytes.push(u8::from_str_radix(tok, 16).unwrap());
            }
        }
        blocks.push(bytes);
        rest = &rest[close + 3..];
    }
    blocks
}

#[test]
fn spec_examples_match_the_vectors() {
    let doc_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let golden = |file: &str| parse(&std::fs::read_to_string(vector_dir().join(format!("{file}.hex"))).unwrap());

    let examples = doc_blocks(&doc, "## 10. Annotated examples", 2);
    assert_eq!(examples[0], golden("hello"), "HELLO example");
    assert_eq!(examples[1], golden("post"), "POST example");

    let worked = doc_blocks(&doc, "**Worked example.**", 1);
    assert_eq!(worked[0], golden("posted")[HEADER_LEN..], "POSTED body example");
}
