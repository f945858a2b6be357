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

/// The SHA-256 of "hello".
fn hello_sha() -> [u8; 32] {
    let mut sha = [0u8; 32];
    hex::decode_to_slice("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", &mut sha).unwrap();
    sha
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

fn setting(key: &str, value: &str) -> Setting {
    Setting { key: key.into(), value: value.into() }
}

fn presence() -> PresenceEntry {
    PresenceEntry { user_id: UserId(7), status: PresenceStatus::ONLINE, last_seen_ms: 1_700_000_000_000 }
}

fn read_state() -> ReadState {
    ReadState { room: RoomId(300), head: Seq(12), delivered: Seq(9), read: Seq(7), unread: 4, mentions: 1 }
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
        c("get_profile", "GET_PROFILE id=14 user=None (one's own)", 14, ClientFrame::GetProfile(GetProfile { user: None })),
        c(
            "get_profile_other",
            "GET_PROFILE id=14 user=Some(\"bob\")",
            14,
            ClientFrame::GetProfile(GetProfile { user: Some("bob".into()) }),
        ),
        c(
            "update_profile",
            "UPDATE_PROFILE id=15 email=Some(Some(\"Ann@Example.org\")) display_name=Some(\"Ann L.\")",
            15,
            ClientFrame::UpdateProfile(UpdateProfile {
                email: Some(Some("Ann@Example.org".into())),
                display_name: Some("Ann L.".into()),
            }),
        ),
        c(
            "update_profile_clear_email",
            "UPDATE_PROFILE id=15 email=Some(None) (remove it) display_name=None (unchanged)",
            15,
            ClientFrame::UpdateProfile(UpdateProfile { email: Some(None), display_name: None }),
        ),
        c(
            "get_settings",
            "GET_SETTINGS id=16 after_room=0 limit=0 (the first page, of the server's default size)",
            16,
            ClientFrame::GetSettings(GetSettings { after_room: RoomId(0), limit: 0 }),
        ),
        c(
            "set_setting",
            "SET_SETTING id=17 key=\"notify.300\" value=\"mentions\"",
            17,
            ClientFrame::SetSetting(SetSetting { key: "notify.300".into(), value: "mentions".into() }),
        ),
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
            "profile",
            "PROFILE id=14 user_id=7 user=\"ann\" email=Some(\"Ann@Example.org\") display_name=\"Ann L.\"",
            14,
            ServerFrame::Profile(Profile {
                user_id: UserId(7),
                user: "ann".into(),
                email: Some("Ann@Example.org".into()),
                display_name: "Ann L.".into(),
            }),
        ),
        s(
            "settings",
            "SETTINGS id=16 version=3 entries=[media.auto_load=true, media.low_quality_images=false, notify.300=mentions] next_after=None",
            16,
            ServerFrame::Settings(Settings {
                version: 3,
                entries: vec![
                    setting("media.auto_load", "true"),
                    setting("media.low_quality_images", "false"),
                    setting("notify.300", "mentions"),
                ],
                next_after: None,
            }),
        ),
        s(
            "setting",
            "SETTING id=17 version=4 key=\"notify.300\" value=\"mentions\"",
            17,
            ServerFrame::Setting(SettingChanged { version: 4, key: "notify.300".into(), value: "mentions".into() }),
        ),
        s(
            "setting_changed",
            "SETTING_CHANGED (push) id=0 version=5 key=\"media.auto_load\" value=\"false\"",
            0,
            ServerFrame::SettingChanged(SettingChanged {
                version: 5,
                key: "media.auto_load".into(),
                value: "false".into(),
            }),
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
            "moderate",
            "MODERATE id=16 room=300 user=\"bob\" action=SET_ROLE(7) role=\"moderator\"",
            16,
            ClientFrame::Moderate(Moderate {
                room: RoomId(300),
                user: "bob".into(),
                action: ModAction::SET_ROLE,
                role: "moderator".into(),
            }),
        ),
        c(
            "define_role",
            "DEFINE_ROLE id=17 room=300 name=\"helper\" permissions=Some(read|post|pin = 0x43)",
            17,
            ClientFrame::DefineRole(DefineRole {
                room: RoomId(300),
                name: "helper".into(),
                permissions: Some(Permissions(0x43)),
            }),
        ),
        c(
            "create_server",
            "CREATE_SERVER id=18 name=\"rust\" description=\"crabs\" public=true",
            18,
            ClientFrame::CreateServer(CreateServer { name: "rust".into(), description: "crabs".into(), public: true }),
        ),
        c("join_server", "JOIN_SERVER id=19 server=5", 19, ClientFrame::JoinServer(ServerRef { server: ServerId(5) })),
        c("leave_server", "LEAVE_SERVER id=20 server=5", 20, ClientFrame::LeaveServer(ServerRef { server: ServerId(5) })),
        c(
            "list_servers",
            "LIST_SERVERS id=21 after_server=0 limit=100",
            21,
            ClientFrame::ListServers(ListServers { after_server: ServerId(0), limit: 100 }),
        ),
        c(
            "create_channel",
            "CREATE_CHANNEL id=22 server=5 name=\"staff\" voice=false read_roles=[\"moderator\"] post_roles=[]",
            22,
            ClientFrame::CreateChannel(CreateChannel {
                server: ServerId(5),
                name: "staff".into(),
                voice: false,
                read_roles: vec!["moderator".into()],
                post_roles: vec![],
            }),
        ),
        c(
            "set_server_role",
            "SET_SERVER_ROLE id=23 server=5 user=\"bob\" role=\"admin\"",
            23,
            ClientFrame::SetServerRole(SetServerRole { server: ServerId(5), user: "bob".into(), role: "admin".into() }),
        ),
        c(
            "define_server_role",
            "DEFINE_SERVER_ROLE id=24 server=5 name=\"member\" permissions=Some(read = 0x1)",
            24,
            ClientFrame::DefineServerRole(DefineServerRole {
                server: ServerId(5),
                name: "member".into(),
                permissions: Some(Permissions(1)),
            }),
        ),
        s(
            "server_info",
            "SERVER_INFO id=18 server=5 name=\"rust\" description=\"crabs\" public=true owner=7 members=1 member_cap=1000000 role=\"owner\" channels=[{room=300 name=\"general\" kind=CHANNEL(5) head_seq=1}]",
            18,
            ServerFrame::ServerInfo(Box::new(ServerInfo {
                server: ServerId(5),
                name: "rust".into(),
                description: "crabs".into(),
                public: true,
                owner: UserId(7),
                members: 1,
                member_cap: 1_000_000,
                role: "owner".into(),
                channels: vec![RoomInfo { room: RoomId(300), name: "general".into(), kind: RoomKind::CHANNEL, head_seq: Seq(1) }],
            })),
        ),
        s(
            "server_list",
            "SERVER_LIST id=21 servers=[] next_after=None",
            21,
            ServerFrame::ServerList(ServerList { servers: vec![], next_after: None }),
        ),
        c(
            "receipt",
            "RECEIPT id=25 room=300 delivered=9 read=7",
            25,
            ClientFrame::Receipt(Receipt { room: RoomId(300), delivered: Seq(9), read: Seq(7) }),
        ),
        c("unread", "UNREAD id=26 after_room=0 limit=0", 26, ClientFrame::Unread(Unread { after_room: RoomId(0), limit: 0 })),
        c("notifications", "NOTIFICATIONS id=27 limit=50", 27, ClientFrame::Notifications(Notifications { limit: 50 })),
        s(
            "read_state",
            "READ_STATE id=25 room=300 head=12 delivered=9 read=7 unread=4 mentions=1",
            25,
            ServerFrame::ReadState(read_state()),
        ),
        s(
            "unread_list",
            "UNREAD_LIST id=26 rooms=[{room=300 head=12 delivered=9 read=7 unread=4 mentions=1}] next_after=None",
            26,
            ServerFrame::UnreadList(UnreadList { rooms: vec![read_state()], next_after: None }),
        ),
        s(
            "unread_at_login",
            "UNREAD_AT_LOGIN (push) id=0 rooms=[{room=300 head=12 delivered=9 read=7 unread=4 mentions=1}] next_after=None",
            0,
            ServerFrame::UnreadAtLogin(UnreadList { rooms: vec![read_state()], next_after: None }),
        ),
        s(
            "notification_list",
            "NOTIFICATION_LIST id=27 notifications=[{room=300 seq=8 author=\"bob\" ts_ms=1700000000000 text=\"hi @ann\" read=false}]",
            27,
            ServerFrame::NotificationList(NotificationList {
                notifications: vec![Notification {
                    room: RoomId(300),
                    seq: Seq(8),
                    author: "bob".into(),
                    ts_ms: 1_700_000_000_000,
                    text: Some("hi @ann".into()),
                    read: false,
                }],
            }),
        ),
        s(
            "read_state_changed",
            "READ_STATE_CHANGED (push) id=0, the READ_STATE body: another device of the user read",
            0,
            ServerFrame::ReadStateChanged(read_state()),
        ),
        c("typing", "TYPING id=28 room=300", 28, ClientFrame::Typing(Typing { room: RoomId(300) })),
        c(
            "set_presence",
            "SET_PRESENCE id=29 status=AWAY(2)",
            29,
            ClientFrame::SetPresence(SetPresence { status: PresenceStatus::AWAY }),
        ),
        c(
            "watch_presence",
            "WATCH_PRESENCE id=30 users=[7, 8]",
            30,
            ClientFrame::WatchPresence(WatchPresence { users: vec![UserId(7), UserId(8)] }),
        ),
        s(
            "presence_list",
            "PRESENCE_LIST id=30 entries=[{user_id=7 status=ONLINE(1) last_seen_ms=1700000000000}]",
            30,
            ServerFrame::PresenceList(PresenceList { entries: vec![presence()] }),
        ),
        s(
            "typing_now",
            "TYPING_NOW (push) id=0 room=300 user_id=7 user=\"ann\"",
            0,
            ServerFrame::TypingNow(TypingNow { room: RoomId(300), user_id: UserId(7), user: "ann".into() }),
        ),
        s(
            "presence_changed",
            "PRESENCE_CHANGED (push) id=0 user_id=7 status=ONLINE(1) last_seen_ms=1700000000000",
            0,
            ServerFrame::PresenceChanged(presence()),
        ),
        c(
            "call",
            "CALL id=31 room=300 action=ACCEPT(2) call=14 data=\"v=0\"",
            31,
            ClientFrame::Call(Call { room: RoomId(300), action: CallAction::ACCEPT, call: Seq(14), data: "v=0".into() }),
        ),
        s(
            "delta_call_invite",
            "DELTA (push) id=0 room=300 seq=14 author_id=7 author=\"ann\" ts_ms=1700000000000 body=CALL_INVITE(20) call=0 data=\"v=0\" (CALL_ACCEPT(21), CALL_END(22) have the same payload)",
            0,
            ServerFrame::Delta(delta(14, DeltaBody::CallInvite(CallBody { call: Seq(0), data: "v=0".into() }))),
        ),
        c(
            "upload_begin",
            "UPLOAD_BEGIN id=40 room=300 name=\"a.txt\" size=5 media_type=\"text/plain\" sha256=2c f2 4d ba ... (SHA-256 of \"hello\")",
            40,
            ClientFrame::UploadBegin(UploadBegin {
                room: RoomId(300),
                name: "a.txt".into(),
                size: 5,
                media_type: "text/plain".into(),
                sha256: hello_sha(),
            }),
        ),
        c("upload_resume", "UPLOAD_RESUME id=41 upload=9", 41, ClientFrame::UploadResume(UploadResume { upload: 9 })),
        c(
            "upload_chunk",
            "UPLOAD_CHUNK id=42 upload=9 offset=0 data=\"hello\" (a varint length, then the bytes)",
            42,
            ClientFrame::UploadChunk(UploadChunk { upload: 9, offset: 0, data: b"hello".to_vec() }),
        ),
        c(
            "upload_finish",
            "UPLOAD_FINISH id=43 upload=9 caption=\"hi\"",
            43,
            ClientFrame::UploadFinish(UploadFinish { upload: 9, caption: "hi".into() }),
        ),
        c(
            "download",
            "DOWNLOAD id=44 file=12 offset=0 length=0 (to the end)",
            44,
            ClientFrame::Download(Download { file: 12, offset: 0, length: 0 }),
        ),
        c(
            "download_ack",
            "DOWNLOAD_ACK id=45 download=44 received=65536",
            45,
            ClientFrame::DownloadAck(DownloadAck { download: 44, received: 65536 }),
        ),
        c(
            "forward",
            "FORWARD id=46 room=300 seq=14 to_room=301",
            46,
            ClientFrame::Forward(Forward { room: RoomId(300), seq: Seq(14), to_room: RoomId(301) }),
        ),
        s(
            "upload_state",
            "UPLOAD_STATE id=40 upload=9 offset=0 size=5 chunk_size=65536 window=16",
            40,
            ServerFrame::UploadState(UploadState { upload: 9, offset: 0, size: 5, chunk_size: 65536, window: 16 }),
        ),
        s(
            "chunk_stored",
            "CHUNK_STORED id=42 upload=9 offset=5",
            42,
            ServerFrame::ChunkStored(ChunkStored { upload: 9, offset: 5 }),
        ),
        s(
            "file_stored",
            "FILE_STORED id=43 file=12 room=300 seq=15 sha256=2c f2 4d ba ...",
            43,
            ServerFrame::FileStored(FileStored { file: 12, room: RoomId(300), seq: Seq(15), sha256: hello_sha() }),
        ),
        s(
            "download_meta",
            "DOWNLOAD_META id=44 file=12 name=\"a.txt\" size=5 media_type=\"text/plain\" sha256=2c f2 ... offset=0 length=5 window=1048576",
            44,
            ServerFrame::DownloadMeta(Box::new(DownloadMeta {
                file: 12,
                name: "a.txt".into(),
                size: 5,
                media_type: "text/plain".into(),
                sha256: hello_sha(),
                offset: 0,
                length: 5,
                window: 1_048_576,
            })),
        ),
        s(
            "file_chunk",
            "FILE_CHUNK (push) id=0 download=44 offset=0 data=\"hello\"",
            0,
            ServerFrame::FileChunk(FileChunk { download: 44, offset: 0, data: b"hello".to_vec() }),
        ),
        s(
            "delta_file_shared",
            "DELTA (push) id=0 room=300 seq=15 author_id=7 author=\"ann\" ts_ms=1700000000000 body=FILE_SHARED(23) file=12 name=\"a.txt\" size=5 media_type=\"text/plain\" sha256=2c f2 ... caption=\"hi\"",
            0,
            ServerFrame::Delta(delta(
                15,
                DeltaBody::FileShared(Box::new(FileBody {
                    file: 12,
                    name: "a.txt".into(),
                    size: 5,
                    media_type: "text/plain".into(),
                    sha256: hello_sha(),
                    caption: "hi".into(),
                })),
            )),
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
        c(
            "moderate_server",
            "MODERATE_SERVER id=25 server=5 user=\"bob\" action=INVITE(1) (answered by DONE)",
            25,
            ClientFrame::ModerateServer(ModerateServer { server: ServerId(5), user: "bob".into(), action: ModAction::INVITE }),
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
            "delta_kick",
            "DELTA (push) id=0 room=300 seq=11 author_id=7 author=\"ann\" ts_ms=1700000000000 body=KICK(13) user=8 name=\"bob\" (INVITE, BAN, UNBAN, MUTE, UNMUTE have the same payload)",
            0,
            ServerFrame::Delta(delta(11, DeltaBody::Kick(MemberBody { user: UserId(8), name: "bob".into() }))),
        ),
        s(
            "delta_role",
            "DELTA (push) id=0 room=300 seq=12 author_id=7 author=\"ann\" ts_ms=1700000000000 body=ROLE(18) user=8 role=\"moderator\"",
            0,
            ServerFrame::Delta(delta(12, DeltaBody::Role(RoleBody { user: UserId(8), role: "moderator".into() }))),
        ),
        s(
            "delta_role_defined",
            "DELTA (push) id=0 room=300 seq=13 author_id=7 author=\"ann\" ts_ms=1700000000000 body=ROLE_DEFINED(19) role=\"helper\" permissions=Some(0x43)",
            0,
            ServerFrame::Delta(delta(
                13,
                DeltaBody::RoleDefined(RoleDefinedBody { role: "helper".into(), permissions: Some(Permissions(0x43)) }),
            )),
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
