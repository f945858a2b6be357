//! Property tests of the frame codec: the decoder never panics on any bytes however they are
//! split, every valid frame round-trips through any chunking of the stream, oversized and
//! undersized length prefixes are refused at once, and trailing body bytes are rejected.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use chime_protocol::frame::{decode_body, encode};
use chime_protocol::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    // Mostly short, sometimes past the one-byte varint length, always valid UTF-8.
    prop_oneof![4 => any::<String>(), 1 => "[a-z\u{e9}\u{1f600}]{100,200}"]
}

fn room() -> impl Strategy<Value = RoomId> {
    any::<u64>().prop_map(RoomId)
}

fn user() -> impl Strategy<Value = UserId> {
    any::<u64>().prop_map(UserId)
}

fn seq() -> impl Strategy<Value = Seq> {
    any::<u64>().prop_map(Seq)
}

/// Every body shape: the known kinds, and kinds this build does not know with any payload.
fn delta_body() -> impl Strategy<Value = DeltaBody> {
    let known: Vec<u16> = (1..=23).collect();
    prop_oneof![
        text().prop_map(|name| DeltaBody::Create(CreateBody { name })),
        text().prop_map(DeltaBody::message),
        Just(DeltaBody::Join),
        Just(DeltaBody::Leave),
        (seq(), text()).prop_map(|(target, text)| DeltaBody::Edit(EditBody { target, text })),
        seq().prop_map(|target| DeltaBody::Delete(TargetBody { target })),
        (seq(), text()).prop_map(|(target, emoji)| DeltaBody::React(ReactBody { target, emoji })),
        (seq(), text()).prop_map(|(target, emoji)| DeltaBody::Unreact(ReactBody { target, emoji })),
        (seq(), text()).prop_map(|(reply_to, text)| DeltaBody::Reply(ReplyBody { reply_to, text })),
        seq().prop_map(|target| DeltaBody::Pin(TargetBody { target })),
        seq().prop_map(|target| DeltaBody::Unpin(TargetBody { target })),
        (user(), text(), 0u8..6).prop_map(|(user, name, k)| {
            let m = MemberBody { user, name };
            [DeltaBody::Invite, DeltaBody::Kick, DeltaBody::Ban, DeltaBody::Unban, DeltaBody::Mute, DeltaBody::Unmute]
                [usize::from(k)](m)
        }),
        (user(), text()).prop_map(|(user, role)| DeltaBody::Role(RoleBody { user, role })),
        (seq(), text(), 0u8..3).prop_map(|(call, data, k)| {
            let c = CallBody { call, data };
            [DeltaBody::CallInvite, DeltaBody::CallAccept, DeltaBody::CallEnd][usize::from(k)](c)
        }),
        (text(), option::of(any::<u32>()))
            .prop_map(|(role, p)| DeltaBody::RoleDefined(RoleDefinedBody { role, permissions: p.map(Permissions) })),
        ((any::<u64>(), text(), any::<u64>()), (text(), any::<[u8; 32]>(), text())).prop_map(
            |((file, name, size), (media_type, sha256, caption))| DeltaBody::FileShared(Box::new(FileBody {
                file,
                name,
                size,
                media_type,
                sha256,
                caption
            }))
        ),
        (any::<u16>().prop_filter("unknown", move |k| !known.contains(k)), vec(any::<u8>(), 0..40))
            .prop_map(|(kind, payload)| DeltaBody::Unknown { kind: DeltaKind(kind), payload }),
    ]
}

fn limits() -> impl Strategy<Value = Limits> {
    (vec(any::<u32>(), 13..=13)).prop_map(|v| Limits {
        max_frame: v[0],
        heartbeat_secs: v[1],
        max_text: v[2],
        max_key: v[3],
        max_room_name: v[4],
        max_user_name: v[5],
        min_password: v[6],
        max_password: v[7],
        max_in_flight: v[8],
        max_queued_during_login: v[9],
        default_page: v[10],
        max_page: v[11],
        max_sync_rooms: v[12],
    })
}

fn room_kind() -> impl Strategy<Value = RoomKind> {
    any::<u8>().prop_map(RoomKind)
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode)
}

fn ping() -> impl Strategy<Value = Ping> {
    any::<u64>().prop_map(|nonce| Ping { nonce })
}

fn credentials() -> impl Strategy<Value = Credentials> {
    (text(), text(), text()).prop_map(|(user, password, user_agent)| Credentials { user, password, user_agent })
}

fn setting_changed() -> impl Strategy<Value = SettingChanged> {
    (any::<u64>(), text(), text()).prop_map(|(version, key, value)| SettingChanged { version, key, value })
}

fn cursor() -> impl Strategy<Value = RoomCursor> {
    (room(), seq()).prop_map(|(room, seq)| RoomCursor { room, seq })
}

fn room_info() -> impl Strategy<Value = RoomInfo> {
    (room(), text(), room_kind(), seq()).prop_map(|(room, name, kind, head_seq)| RoomInfo {
        room,
        name,
        kind,
        head_seq,
    })
}

fn delta() -> impl Strategy<Value = Delta> {
    (room(), seq(), user(), text(), any::<i64>(), delta_body())
        .prop_map(|(room, seq, author_id, author, ts_ms, body)| Delta { room, seq, author_id, author, ts_ms, body })
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>(), any::<u16>(), text(), text()).prop_map(
            |(magic, max_version, min_version, client_name, client_version)| {
                ClientFrame::Hello(Hello { magic, max_version, min_version, client_name, client_version })
            }
        ),
        Just(ClientFrame::Whoami(Empty {})),
        proptest::option::of(text()).prop_map(|user| ClientFrame::GetProfile(GetProfile { user })),
        (proptest::option::of(proptest::option::of(text())), proptest::option::of(text()))
            .prop_map(|(email, display_name)| ClientFrame::UpdateProfile(UpdateProfile { email, display_name })),
        (room(), any::<u32>())
            .prop_map(|(after_room, limit)| ClientFrame::GetSettings(GetSettings { after_room, limit })),
        (text(), text()).prop_map(|(key, value)| ClientFrame::SetSetting(SetSetting { key, value })),
        room().prop_map(|room| ClientFrame::GetRoom(RoomRef { room })),
        ping().prop_map(ClientFrame::Ping),
        ping().prop_map(ClientFrame::Pong),
        credentials().prop_map(ClientFrame::Register),
        credentials().prop_map(ClientFrame::Login),
        (text(), text()).prop_map(|(token, user_agent)| ClientFrame::Resume(Resume { token, user_agent })),
        Just(ClientFrame::Logout(Empty {})),
        (text(), room_kind()).prop_map(|(name, kind)| ClientFrame::CreateRoom(CreateRoom { name, kind })),
        room().prop_map(|room| ClientFrame::JoinRoom(RoomRef { room })),
        room().prop_map(|room| ClientFrame::LeaveRoom(RoomRef { room })),
        (room(), any::<u32>()).prop_map(|(after_room, limit)| ClientFrame::ListRooms(ListRooms { after_room, limit })),
        (any::<u64>(), any::<u32>())
            .prop_map(|(after_session, limit)| ClientFrame::ListSessions(ListSessions { after_session, limit })),
        proptest::option::of(any::<u64>()).prop_map(|session| ClientFrame::RevokeSessions(RevokeSessions { session })),
        (room(), user(), any::<u32>()).prop_map(|(room, after_user, limit)| ClientFrame::ListMembers(ListMembers {
            room,
            after_user,
            limit
        })),
        (room(), text(), text()).prop_map(|(room, idempotency_key, text)| ClientFrame::Post(Post {
            room,
            idempotency_key,
            text
        })),
        (vec(cursor(), 0..5), any::<u32>()).prop_map(|(rooms, page_size)| ClientFrame::Sync(Sync { rooms, page_size })),
        (room(), seq(), any::<u32>()).prop_map(|(room, after, limit)| ClientFrame::History(History {
            room,
            after,
            limit
        })),
        (room(), seq(), text(), text()).prop_map(|(room, target, idempotency_key, text)| ClientFrame::Edit(Edit {
            room,
            target,
            idempotency_key,
            text
        })),
        (room(), seq()).prop_map(|(room, target)| ClientFrame::Delete(DeleteMessage { room, target })),
        text().prop_map(|user| ClientFrame::OpenDirect(OpenDirect { user })),
        (room(), seq(), seq()).prop_map(|(room, delivered, read)| ClientFrame::Receipt(Receipt {
            room,
            delivered,
            read
        })),
        (room(), any::<u32>()).prop_map(|(after_room, limit)| ClientFrame::Unread(Unread { after_room, limit })),
        any::<u32>().prop_map(|limit| ClientFrame::Notifications(Notifications { limit })),
        (room(), any::<u8>(), seq(), text()).prop_map(|(room, a, call, data)| ClientFrame::Call(Call {
            room,
            action: CallAction(a),
            call,
            data
        })),
        room().prop_map(|room| ClientFrame::Typing(Typing { room })),
        any::<u8>().prop_map(|s| ClientFrame::SetPresence(SetPresence { status: PresenceStatus(s) })),
        vec(user(), 0..5).prop_map(|users| ClientFrame::WatchPresence(WatchPresence { users })),
        (text(), text(), any::<bool>()).prop_map(|(name, description, public)| ClientFrame::CreateServer(
            CreateServer { name, description, public }
        )),
        any::<u64>().prop_map(|s| ClientFrame::JoinServer(ServerRef { server: ServerId(s) })),
        any::<u64>().prop_map(|s| ClientFrame::LeaveServer(ServerRef { server: ServerId(s) })),
        (any::<u64>(), any::<u32>())
            .prop_map(|(s, limit)| ClientFrame::ListServers(ListServers { after_server: ServerId(s), limit })),
        (any::<u64>(), text(), any::<bool>(), vec(text(), 0..3), vec(text(), 0..3)).prop_map(
            |(s, name, voice, read_roles, post_roles)| ClientFrame::CreateChannel(CreateChannel {
                server: ServerId(s),
                name,
                voice,
                read_roles,
                post_roles
            })
        ),
        (any::<u64>(), text(), text()).prop_map(|(s, user, role)| ClientFrame::SetServerRole(SetServerRole {
            server: ServerId(s),
            user,
            role
        })),
        (any::<u64>(), text(), option::of(any::<u32>())).prop_map(|(s, name, p)| ClientFrame::DefineServerRole(
            DefineServerRole { server: ServerId(s), name, permissions: p.map(Permissions) }
        )),
        (room(), text(), any::<u8>(), text()).prop_map(|(room, user, a, role)| ClientFrame::Moderate(Moderate {
            room,
            user,
            action: ModAction(a),
            role
        })),
        (room(), text(), option::of(any::<u32>())).prop_map(|(room, name, p)| ClientFrame::DefineRole(DefineRole {
            room,
            name,
            permissions: p.map(Permissions)
        })),
        (room(), seq(), text(), any::<bool>()).prop_map(|(room, target, emoji, remove)| ClientFrame::React(React {
            room,
            target,
            emoji,
            remove
        })),
        (room(), seq(), text(), text()).prop_map(|(room, reply_to, idempotency_key, text)| ClientFrame::Reply(Reply {
            room,
            reply_to,
            idempotency_key,
            text
        })),
        (room(), seq(), any::<bool>()).prop_map(|(room, target, remove)| ClientFrame::Pin(Pin {
            room,
            target,
            remove
        })),
        (room(), seq(), any::<u32>()).prop_map(|(room, before, limit)| ClientFrame::View(View { room, before, limit })),
        (room(), any::<u8>(), seq(), any::<u32>()).prop_map(|(room, order, cursor, limit)| ClientFrame::Restore(
            Restore { room, order: RestoreOrder(order), cursor, limit }
        )),
        (room(), text(), seq(), any::<u32>()).prop_map(|(room, query, before, limit)| ClientFrame::Search(Search {
            room,
            query,
            before,
            limit
        })),
        (any::<u64>(), text(), any::<u8>()).prop_map(|(s, user, a)| ClientFrame::ModerateServer(ModerateServer {
            server: ServerId(s),
            user,
            action: ModAction(a)
        })),
        (room(), text(), any::<u64>(), text(), any::<[u8; 32]>()).prop_map(|(room, name, size, media_type, sha256)| {
            ClientFrame::UploadBegin(UploadBegin { room, name, size, media_type, sha256 })
        }),
        any::<u64>().prop_map(|upload| ClientFrame::UploadResume(UploadResume { upload })),
        (any::<u64>(), any::<u64>(), vec(any::<u8>(), 0..300))
            .prop_map(|(upload, offset, data)| ClientFrame::UploadChunk(UploadChunk { upload, offset, data })),
        (any::<u64>(), text())
            .prop_map(|(upload, caption)| ClientFrame::UploadFinish(UploadFinish { upload, caption })),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(file, offset, length)| ClientFrame::Download(Download {
            file,
            offset,
            length
        })),
        (any::<u32>(), any::<u64>())
            .prop_map(|(download, received)| ClientFrame::DownloadAck(DownloadAck { download, received })),
        (room(), seq(), room()).prop_map(|(room, seq, to_room)| ClientFrame::Forward(Forward { room, seq, to_room })),
    ]
}

fn presence() -> impl Strategy<Value = PresenceEntry> {
    (user(), any::<u8>(), any::<i64>()).prop_map(|(user_id, s, last_seen_ms)| PresenceEntry {
        user_id,
        status: PresenceStatus(s),
        last_seen_ms,
    })
}

fn read_state() -> impl Strategy<Value = ReadState> {
    (room(), seq(), seq(), seq(), any::<u64>(), any::<u64>()).prop_map(
        |(room, head, delivered, read, unread, mentions)| ReadState { room, head, delivered, read, unread, mentions },
    )
}

fn server_info() -> impl Strategy<Value = ServerInfo> {
    (
        (any::<u64>(), text(), text(), any::<bool>()),
        (user(), any::<u64>(), any::<u64>(), text()),
        vec(room_info(), 0..3),
    )
        .prop_map(|((s, name, description, public), (owner, members, member_cap, role), channels)| ServerInfo {
            server: ServerId(s),
            name,
            description,
            public,
            owner,
            members,
            member_cap,
            role,
            channels,
        })
}

fn message_view() -> impl Strategy<Value = MessageView> {
    (
        (seq(), user(), text(), any::<i64>()),
        (option::of(text()), option::of(any::<i64>()), any::<bool>(), option::of(seq()), any::<bool>()),
        vec((text(), any::<u64>(), any::<bool>()), 0..3),
    )
        .prop_map(|((seq, author_id, author, ts_ms), (text, edited_ms, deleted, reply_to, pinned), reactions)| {
            MessageView {
                seq,
                author_id,
                author,
                ts_ms,
                text,
                edited_ms,
                deleted,
                reply_to,
                pinned,
                reactions: reactions
                    .into_iter()
                    .map(|(emoji, count, mine)| ReactionCount { emoji, count, mine })
                    .collect(),
            }
        })
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (any::<[u16; 3]>(), text(), text(), limits()).prop_map(|(versions, server_name, server_version, limits)| {
            ServerFrame::Welcome(Welcome {
                protocol_version: versions[0],
                min_version: versions[1],
                max_version: versions[2],
                server_name,
                server_version,
                limits,
            })
        }),
        ping().prop_map(ServerFrame::Ping),
        ping().prop_map(ServerFrame::Pong),
        (error_code(), text(), any::<bool>()).prop_map(|(code, message, retryable)| ServerFrame::Error(ErrorBody {
            code,
            message,
            retryable
        })),
        (user(), text(), proptest::option::of(text())).prop_map(|(user_id, user, token)| ServerFrame::Authed(Authed {
            user_id,
            user,
            token
        })),
        (user(), text(), any::<u64>()).prop_map(|(user_id, user, session)| ServerFrame::Identity(Identity {
            user_id,
            user,
            session
        })),
        (room_info(), any::<u64>(), text()).prop_map(|(info, members, role)| ServerFrame::RoomDetails(RoomDetails {
            info,
            members,
            role
        })),
        Just(ServerFrame::Done(Empty {})),
        (user(), text(), proptest::option::of(text()), text()).prop_map(|(user_id, user, email, display_name)| {
            ServerFrame::Profile(Profile { user_id, user, email, display_name })
        }),
        (
            any::<u64>(),
            vec((text(), text()).prop_map(|(key, value)| Setting { key, value }), 0..4),
            proptest::option::of(room())
        )
            .prop_map(|(version, entries, next_after)| ServerFrame::Settings(Settings {
                version,
                entries,
                next_after
            })),
        setting_changed().prop_map(ServerFrame::Setting),
        setting_changed().prop_map(ServerFrame::SettingChanged),
        room_info().prop_map(ServerFrame::RoomInfo),
        (vec(room_info(), 0..4), proptest::option::of(room()))
            .prop_map(|(rooms, next_after)| ServerFrame::RoomList(RoomList { rooms, next_after })),
        (
            vec(
                (any::<u64>(), text(), text(), any::<i64>(), any::<i64>(), any::<bool>()).prop_map(
                    |(session, ip, user_agent, created_ms, last_seen_ms, current)| SessionInfo {
                        session,
                        ip,
                        user_agent,
                        created_ms,
                        last_seen_ms,
                        current
                    }
                ),
                0..4
            ),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(sessions, next_after)| ServerFrame::SessionList(SessionList { sessions, next_after })),
        any::<u32>().prop_map(|count| ServerFrame::SessionsRevoked(SessionsRevoked { count })),
        (
            room(),
            vec((user(), text(), text()).prop_map(|(user_id, user, role)| MemberInfo { user_id, user, role }), 0..4),
            proptest::option::of(user())
        )
            .prop_map(|(room, members, next_after)| ServerFrame::MemberList(MemberList {
                room,
                members,
                next_after
            })),
        (room(), seq(), any::<i64>(), any::<bool>())
            .prop_map(|(room, seq, ts_ms, duplicate)| ServerFrame::Posted(Posted { room, seq, ts_ms, duplicate })),
        (room(), vec(delta(), 0..4), any::<bool>(), seq()).prop_map(|(room, deltas, more, resume_after)| {
            ServerFrame::DeltaPage(DeltaPage { room, deltas, more, resume_after })
        }),
        vec(cursor(), 0..5).prop_map(|heads| ServerFrame::SyncDone(SyncDone { heads })),
        delta().prop_map(ServerFrame::Delta),
        read_state().prop_map(ServerFrame::ReadState),
        vec(presence(), 0..3).prop_map(|entries| ServerFrame::PresenceList(PresenceList { entries })),
        presence().prop_map(ServerFrame::PresenceChanged),
        (room(), user(), text()).prop_map(|(room, user_id, user)| ServerFrame::TypingNow(TypingNow {
            room,
            user_id,
            user
        })),
        read_state().prop_map(ServerFrame::ReadStateChanged),
        (vec(read_state(), 0..3), option::of(room()))
            .prop_map(|(rooms, next_after)| ServerFrame::UnreadList(UnreadList { rooms, next_after })),
        (vec(read_state(), 0..3), option::of(room()))
            .prop_map(|(rooms, next_after)| ServerFrame::UnreadAtLogin(UnreadList { rooms, next_after })),
        vec((room(), seq(), text(), any::<i64>(), option::of(text()), any::<bool>()), 0..3).prop_map(|n| {
            ServerFrame::NotificationList(NotificationList {
                notifications: n
                    .into_iter()
                    .map(|(room, seq, author, ts_ms, text, read)| Notification { room, seq, author, ts_ms, text, read })
                    .collect(),
            })
        }),
        (vec(server_info(), 0..3), option::of(any::<u64>())).prop_map(|(servers, next)| ServerFrame::ServerList(
            ServerList { servers, next_after: next.map(ServerId) }
        )),
        (room(), vec(message_view(), 0..3), option::of(seq())).prop_map(|(room, messages, next_before)| {
            ServerFrame::MessagePage(MessagePage { room, messages, next_before })
        }),
        (room(), any::<u8>(), seq(), vec(delta(), 0..4), option::of(seq())).prop_map(
            |(room, order, head, deltas, next)| ServerFrame::RestorePage(RestorePage {
                room,
                order: RestoreOrder(order),
                head,
                deltas,
                next
            })
        ),
        (error_code(), text(), any::<bool>()).prop_map(|(code, message, resync)| ServerFrame::Goodbye(Goodbye {
            code,
            message,
            resync
        })),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(upload, offset, size, chunk_size, window)| ServerFrame::UploadState(UploadState {
                upload,
                offset,
                size,
                chunk_size,
                window
            })
        ),
        (any::<u64>(), any::<u64>())
            .prop_map(|(upload, offset)| ServerFrame::ChunkStored(ChunkStored { upload, offset })),
        (any::<u64>(), room(), seq(), any::<[u8; 32]>())
            .prop_map(|(file, room, seq, sha256)| ServerFrame::FileStored(FileStored { file, room, seq, sha256 })),
        ((any::<u64>(), text(), any::<u64>(), text()), (any::<[u8; 32]>(), any::<u64>(), any::<u64>(), any::<u32>()))
            .prop_map(|((file, name, size, media_type), (sha256, offset, length, window))| {
                ServerFrame::DownloadMeta(Box::new(DownloadMeta {
                    file,
                    name,
                    size,
                    media_type,
                    sha256,
                    offset,
                    length,
                    window,
                }))
            }),
        (any::<u32>(), any::<u64>(), vec(any::<u8>(), 0..300))
            .prop_map(|(download, offset, data)| ServerFrame::FileChunk(FileChunk { download, offset, data })),
    ]
}

/// Cuts `bytes` into consecutive chunks at the given points (taken modulo the length, any order).
fn chunks(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> =
        cuts.iter().map(|c| if bytes.is_empty() { 0 } else { c % (bytes.len() + 1) }).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
}

/// Feeds the chunks one by one, splitting off every complete frame as it becomes available.
fn feed(decoder: &FrameDecoder, parts: &[Vec<u8>]) -> Result<(Vec<RawFrame>, BytesMut), DecodeError> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for part in parts {
        buf.extend_from_slice(part);
        while let Some(raw) = decoder.decode(&mut buf)? {
            frames.push(raw);
        }
    }
    Ok((frames, buf))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048), cuts in vec(any::<usize>(), 0..8), max in 0u32..4096) {
        let decoder = FrameDecoder::new(max);
        let mut buf = BytesMut::new();
        'feed: for part in chunks(&bytes, &cuts) {
            buf.extend_from_slice(&part);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(raw)) => {
                        prop_assert!(raw.body.len() + 6 <= max as usize);
                        let _ = ClientFrame::decode(&raw);
                        let _ = ServerFrame::decode(&raw);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        prop_assert!(e.is_fatal(), "the frame decoder only fails on lengths: {e}");
                        break 'feed;
                    }
                }
            }
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic(code in any::<u16>(), body in vec(any::<u8>(), 0..512)) {
        let bytes = encode(FrameType(code), 1, &()).unwrap();
        let mut frame = bytes.to_vec();
        frame.extend_from_slice(&body);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let mut buf = BytesMut::from(&frame[..]);
        let raw = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(&raw.body[..], &body[..]);
        for result in [ClientFrame::decode(&raw).err(), ServerFrame::decode(&raw).err()].into_iter().flatten() {
            prop_assert!(!result.is_fatal());
        }
    }

    #[test]
    fn client_frames_round_trip(frames in vec((any::<u32>(), client_frame()), 1..6), cuts in vec(any::<usize>(), 0..12)) {
        let mut stream = Vec::new();
        for (id, f) in &frames {
            let one = f.encode(*id).unwrap();
            let before = stream.len();
            f.encode_into(&mut stream, *id).unwrap();
            prop_assert_eq!(&stream[before..], &one[..]);
        }
        let (raws, rest) = feed(&FrameDecoder::default(), &chunks(&stream, &cuts)).unwrap();
        prop_assert!(rest.is_empty());
        let decoded: Vec<(u32, ClientFrame)> =
            raws.iter().map(|r| (r.request_id, ClientFrame::decode(r).unwrap())).collect();
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn server_frames_round_trip(frames in vec((any::<u32>(), server_frame()), 1..6), cuts in vec(any::<usize>(), 0..12)) {
        let mut stream = Vec::new();
        for (id, f) in &frames {
            f.encode_into(&mut stream, *id).unwrap();
        }
        let (raws, rest) = feed(&FrameDecoder::default(), &chunks(&stream, &cuts)).unwrap();
        prop_assert!(rest.is_empty());
        for (raw, (id, f)) in raws.iter().zip(&frames) {
            prop_assert_eq!((raw.ty, raw.request_id), (f.frame_type(), *id));
            let push = matches!(
                f,
                ServerFrame::Delta(_)
                    | ServerFrame::Goodbye(_)
                    | ServerFrame::SettingChanged(_)
                    | ServerFrame::ReadStateChanged(_)
                    | ServerFrame::TypingNow(_)
                    | ServerFrame::PresenceChanged(_)
                    | ServerFrame::UnreadAtLogin(_)
                    | ServerFrame::FileChunk(_)
            );
            prop_assert_eq!(raw.ty.is_push(), push);
        }
        let decoded: Vec<(u32, ServerFrame)> =
            raws.iter().map(|r| (r.request_id, ServerFrame::decode(r).unwrap())).collect();
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body(max in 6u32..1_000_000, over in 1u32..u32::MAX, tail in vec(any::<u8>(), 0..16)) {
        let len = max.saturating_add(over);
        prop_assume!(len > max);
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        buf.extend_from_slice(&tail);
        prop_assert_eq!(FrameDecoder::new(max).decode(&mut buf), Err(DecodeError::TooLarge { len, max }));
        // Three bytes of a prefix are merely incomplete.
        let mut three = BytesMut::from(&len.to_be_bytes()[..3]);
        prop_assert_eq!(FrameDecoder::new(max).decode(&mut three), Ok(None));
    }

    #[test]
    fn undersized_prefix_is_refused(len in 0u32..6, tail in vec(any::<u8>(), 0..16)) {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        buf.extend_from_slice(&tail);
        prop_assert_eq!(FrameDecoder::default().decode(&mut buf), Err(DecodeError::TooShort(len)));
    }

    #[test]
    fn trailing_body_bytes_are_rejected(f in client_frame(), g in server_frame(), extra in vec(any::<u8>(), 1..8)) {
        for (bytes, is_client) in [(f.encode(3).unwrap().to_vec(), true), (g.encode(3).unwrap().to_vec(), false)] {
            let mut bytes = bytes;
            bytes.extend_from_slice(&extra);
            let len = (bytes.len() - 4) as u32;
            bytes[..4].copy_from_slice(&len.to_be_bytes());
            let mut buf = BytesMut::from(&bytes[..]);
            let raw = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
            let err = if is_client { ClientFrame::decode(&raw).unwrap_err() } else { ServerFrame::decode(&raw).unwrap_err() };
            prop_assert_eq!(err, DecodeError::TrailingBytes { ty: raw.ty, extra: extra.len() });
        }
    }
}

#[test]
fn frames_in_the_wrong_direction_are_unknown_types() {
    let raw = |f: Vec<u8>| FrameDecoder::default().decode(&mut BytesMut::from(&f[..])).unwrap().unwrap();
    let hello = raw(ClientFrame::Hello(Hello {
        magic: MAGIC,
        max_version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        client_name: String::new(),
        client_version: String::new(),
    })
    .encode(1)
    .unwrap()
    .to_vec());
    assert_eq!(ServerFrame::decode(&hello), Err(DecodeError::UnknownType(FrameType::HELLO)));
    let done = raw(ServerFrame::Done(Empty {}).encode(1).unwrap().to_vec());
    assert_eq!(ClientFrame::decode(&done), Err(DecodeError::UnknownType(FrameType::DONE)));
}

#[test]
fn truncated_body_is_a_bad_body() {
    // A varint with its continuation bit set and nothing after it.
    let err = decode_body::<RoomRef>(FrameType::JOIN_ROOM, &[0x80]).unwrap_err();
    assert!(matches!(err, DecodeError::BadBody { ty: FrameType::JOIN_ROOM, .. }), "{err:?}");
    assert!(!err.is_fatal());
}

#[test]
fn invalid_utf8_is_a_bad_body() {
    let err = decode_body::<Resume>(FrameType::RESUME, &[0x01, 0xff, 0x00]).unwrap_err();
    assert!(matches!(err, DecodeError::BadBody { .. }), "{err:?}");
}
