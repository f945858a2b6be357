//! The core in memory: no sockets, no database, no clock. A fake [`Io`] records what the core
//! sends and submits; the tests play the workers by handing back the effects a job would return,
//! in whatever order the race under test needs. Each test is one race that end-to-end runs only
//! hit by chance.

use super::*;
use crate::handlers::sync::FetchJob;
use crate::work::{Published, ReplyTo};
use bytes::BytesMut;
use chime_protocol::{
    Authed, ClientFrame, Credentials, Delta, DeltaBody, FrameDecoder, Hello, History, Post, Restore, RestoreOrder,
    Resume, RoomCursor, Sync,
};
use chime_storage::SessionRecord;
use std::collections::HashMap;

/// What the core did, as a loop would see it.
#[derive(Default)]
struct FakeIo {
    /// Frames queued per connection, decoded: (request id, frame).
    sent: HashMap<Key, Vec<(u32, ServerFrame)>>,
    goodbyes: Vec<(Key, ErrorCode)>,
    finished: Vec<Key>,
    closed: Vec<Key>,
    /// Jobs submitted, oldest first.
    submitted: Vec<Work>,
    woken: Vec<Key>,
    /// The database is down.
    down: bool,
    /// Queues are full.
    full: bool,
    /// The class of every frame queued, per connection, in order.
    classes: HashMap<Key, Vec<Class>>,
}

impl Io for FakeIo {
    fn send(&mut self, key: Key, bytes: Bytes, class: Class) {
        self.classes.entry(key).or_default().push(class);
        let mut buf = BytesMut::from(&bytes[..]);
        let decoder = FrameDecoder::default();
        while let Some(raw) = decoder.decode(&mut buf).expect("the core sends whole frames") {
            let frame = ServerFrame::decode(&raw).expect("the core sends valid frames");
            self.sent.entry(key).or_default().push((raw.request_id, frame));
        }
    }

    fn queued(&self, _key: Key) -> usize {
        0
    }

    fn goodbye(&mut self, key: Key, code: ErrorCode, _message: &str, _bye: Bye) {
        self.goodbyes.push((key, code));
    }

    fn finish(&mut self, key: Key) {
        self.finished.push(key);
    }

    fn close(&mut self, key: Key) {
        self.closed.push(key);
    }

    fn submit(&mut self, work: Work) -> bool {
        if self.full {
            return false;
        }
        self.submitted.push(work);
        true
    }

    fn db_down(&self) -> bool {
        self.down
    }

    fn wake(&mut self, key: Key) {
        self.woken.push(key);
    }
}

impl FakeIo {
    /// Takes the frames sent to `key` so far.
    fn take(&mut self, key: Key) -> Vec<(u32, ServerFrame)> {
        self.sent.remove(&key).unwrap_or_default()
    }

    /// The seqs of the DELTA pushes and DELTA_PAGE deltas sent to `key` so far, for `room`.
    fn seqs(&mut self, key: Key, room: u64) -> Vec<u64> {
        let room = RoomId(room);
        let mut seqs = Vec::new();
        for (_, f) in self.take(key) {
            match f {
                ServerFrame::Delta(d) if d.room == room => seqs.push(d.seq.get()),
                ServerFrame::DeltaPage(p) if p.room == room => seqs.extend(p.deltas.iter().map(|d| d.seq.get())),
                _ => {}
            }
        }
        seqs
    }

    /// Takes the oldest submitted job that is a SYNC fetch: (who, room, after, fetch id).
    fn take_fetch(&mut self) -> (ReplyTo, u64, u64, FetchId) {
        let i = self
            .submitted
            .iter()
            .position(|w| match w {
                Work::Shared(j) => j.as_any().downcast_ref::<FetchJob>().is_some_and(|f| f.what().2.is_some()),
                _ => false,
            })
            .expect("a SYNC fetch was submitted");
        let work = self.submitted.remove(i);
        let Work::Shared(job) = &work else { unreachable!() };
        let fetch = job.as_any().downcast_ref::<FetchJob>().expect("a fetch");
        let (room, after, id) = fetch.what();
        (work.reply_to().expect("answers someone"), room.get(), after.get(), id.expect("a sync fetch"))
    }

    /// Takes the oldest submitted job.
    fn take_job(&mut self) -> Work {
        assert!(!self.submitted.is_empty(), "no job was submitted");
        self.submitted.remove(0)
    }
}

fn now(secs: u32) -> Now {
    Now { secs, instant: Instant::now(), ms: 1_700_000_000_000 + i64::from(secs) * 1000 }
}

fn raw(frame: ClientFrame, rid: u32) -> RawFrame {
    let bytes = frame.encode(rid).expect("small");
    FrameDecoder::default().decode(&mut BytesMut::from(&bytes[..])).expect("valid").expect("whole")
}

fn delta(room: u64, seq: u64) -> Delta {
    Delta {
        room: RoomId(room),
        seq: Seq(seq),
        author_id: UserId(99),
        author: "other".into(),
        ts_ms: 0,
        body: DeltaBody::message(format!("{seq}")),
    }
}

fn published(room: u64, seqs: std::ops::RangeInclusive<u64>) -> Published {
    Published::encode(RoomId(room), &seqs.map(|s| delta(room, s)).collect::<Vec<_>>()).expect("non-empty")
}

/// Rooms and the heads a login read, as the worker returns them.
fn heads(rooms: &[(u64, u64)]) -> Vec<(RoomId, Seq)> {
    rooms.iter().map(|&(r, s)| (RoomId(r), Seq(s))).collect()
}

const USER: UserId = UserId(7);
const SESSION: SessionId = 70;

/// A core with one connection at `key`, handshaken.
fn core_with(keys: &[Key]) -> (Core, FakeIo) {
    let mut core = Core::new(Config::default(), Instant::now());
    let mut io = FakeIo::default();
    for &key in keys {
        core.open(ConnRef { key, gen: key as u64 + 1 }, "127.0.0.1".parse().expect("ip"), now(0));
        let hello = hello();
        assert_eq!(core.frame(&mut io, key, raw(ClientFrame::Hello(hello), 1), now(0)), Flow::Continue);
        assert!(matches!(io.take(key)[..], [(1, ServerFrame::Welcome(_))]));
    }
    (core, io)
}

fn hello() -> Hello {
    Hello {
        magic: MAGIC,
        max_version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        client_name: "t".into(),
        client_version: "0".into(),
    }
}

fn to(key: Key, rid: u32) -> ReplyTo {
    ReplyTo { conn: ConnRef { key, gen: key as u64 + 1 }, request_id: rid }
}

/// What a worker returns for a successful login of `key` with request `rid`.
fn login_effects(key: Key, rid: u32, rooms: &[(u64, u64)]) -> Completion {
    let rooms = heads(rooms);
    let session = SessionRecord {
        id: SESSION,
        user_id: USER,
        ip: "127.0.0.1".into(),
        user_agent: "t".into(),
        created_at_ms: 1_700_000_000_000,
        last_used_at_ms: 1_700_000_000_000,
    };
    Completion(vec![
        Effect::LoggedIn { to: to(key, rid), user: USER, name: "me".into(), session, rooms, servers: Vec::new() },
        crate::work::reply(to(key, rid), ServerFrame::Authed(Authed { user_id: USER, user: "me".into(), token: None })),
        Effect::Release { to: to(key, rid), shared: true },
    ])
}

/// Logs connection `key` in (RESUME) with `rooms` as the worker read them.
fn log_in(core: &mut Core, io: &mut FakeIo, key: Key, rooms: &[(u64, u64)]) {
    let resume = Resume { token: "t".into(), user_agent: "t".into() };
    assert_eq!(core.frame(io, key, raw(ClientFrame::Resume(resume), 2), now(1)), Flow::Stop);
    io.take_job();
    core.completion(io, login_effects(key, 2, rooms), now(1));
    assert!(io.take(key).iter().any(|(r, f)| *r == 2 && matches!(f, ServerFrame::Authed(_))));
    // A login queues the job that pushes its unread counts, answering nobody's request.
    let unread = io.submitted.pop().expect("the unread counts at login");
    assert!(unread.is_shared() && unread.reply_to().is_none());
}

#[test]
fn a_login_whose_room_list_is_older_than_what_was_published_catches_up() {
    let (mut core, mut io) = core_with(&[1]);
    let resume = Resume { token: "t".into(), user_agent: "t".into() };
    core.frame(&mut io, 1, raw(ClientFrame::Resume(resume), 2), now(1));
    io.take_job();
    // The worker read room 5 at head 3; meanwhile the loop published 4 and 5 (nobody online).
    core.completion(&mut io, Completion(vec![Effect::Publish(published(5, 4..=5))]), now(1));
    core.completion(&mut io, login_effects(1, 2, &[(5, 3)]), now(1));
    io.take(1);
    // The connection catches up on 4..5 before anything of room 5 goes live.
    let (who, room, after, fetch) = io.take_fetch();
    assert_eq!((room, after), (5, 3));
    core.completion(&mut io, Completion(vec![Effect::Publish(published(5, 6..=6))]), now(2));
    assert!(io.seqs(1, 5).is_empty(), "held while catching up");
    let page = Effect::Page { to: who, room: RoomId(5), fetch, deltas: vec![delta(5, 4), delta(5, 5)], more: false };
    core.completion(&mut io, Completion(vec![page, Effect::Release { to: who, shared: true }]), now(2));
    assert_eq!(io.seqs(1, 5), [4, 5, 6]);
    core.completion(&mut io, Completion(vec![Effect::Publish(published(5, 7..=7))]), now(2));
    assert_eq!(io.seqs(1, 5), [7]);
}

#[test]
fn a_join_made_while_a_login_was_read_is_not_missed() {
    let (mut core, mut io) = core_with(&[1, 2]);
    log_in(&mut core, &mut io, 1, &[]);
    // Connection 2 logs in as the same user; while its room list is read, the user joins room 9
    // from connection 1.
    let resume = Resume { token: "t".into(), user_agent: "t".into() };
    core.frame(&mut io, 2, raw(ClientFrame::Resume(resume), 2), now(1));
    io.take_job();
    core.completion(
        &mut io,
        Completion(vec![
            Effect::Subscribe { user: USER, room: RoomId(9), after: Some(Seq(2)) },
            Effect::Publish(published(9, 3..=3)),
        ]),
        now(1),
    );
    assert_eq!(io.seqs(1, 9), [3]);
    core.completion(&mut io, login_effects(2, 2, &[]), now(1));
    io.take(2);
    core.completion(&mut io, Completion(vec![Effect::Publish(published(9, 4..=4))]), now(2));
    // Connection 2 knew room 9 from just before the JOIN: it catches up on 3, then gets 4.
    let (who, room, after, fetch) = io.take_fetch();
    assert_eq!((who.conn.key, room, after), (2, 9, 2));
    let page = Effect::Page { to: who, room: RoomId(9), fetch, deltas: vec![delta(9, 3)], more: false };
    core.completion(&mut io, Completion(vec![page]), now(2));
    assert_eq!(io.seqs(2, 9), [3, 4]);
    // A leave made while a login is read is not missed either.
    let resume = Resume { token: "t".into(), user_agent: "t".into() };
    core.open(ConnRef { key: 3, gen: 4 }, "127.0.0.1".parse().expect("ip"), now(2));
    let hello = hello();
    core.frame(&mut io, 3, raw(ClientFrame::Hello(hello), 1), now(2));
    core.frame(&mut io, 3, raw(ClientFrame::Resume(resume), 2), now(2));
    io.take_job();
    core.completion(&mut io, Completion(vec![Effect::Unsubscribe { user: USER, room: RoomId(9) }]), now(2));
    core.completion(&mut io, login_effects(3, 2, &[(9, 4)]), now(2));
    io.take(3);
    core.completion(&mut io, Completion(vec![Effect::Publish(published(9, 5..=5))]), now(3));
    assert!(io.seqs(3, 9).is_empty(), "the room list predated the leave");
}

#[test]
fn a_member_leaving_while_a_page_is_in_flight_gets_nothing_more_of_the_room() {
    let (mut core, mut io) = core_with(&[1]);
    log_in(&mut core, &mut io, 1, &[(5, 3), (6, 1)]);
    let sync = Sync {
        rooms: vec![RoomCursor { room: RoomId(5), seq: Seq(0) }, RoomCursor { room: RoomId(6), seq: Seq(1) }],
        page_size: 10,
    };
    core.frame(&mut io, 1, raw(ClientFrame::Sync(sync), 3), now(1));
    let (who5, _, _, fetch5) = io.take_fetch();
    let (who6, _, _, fetch6) = io.take_fetch();
    // The user leaves room 5 (LEAVE published, then unsubscribed) before room 5's page arrives.
    core.completion(
        &mut io,
        Completion(vec![Effect::Publish(published(5, 4..=4)), Effect::Unsubscribe { user: USER, room: RoomId(5) }]),
        now(2),
    );
    let late = Effect::Page { to: who5, room: RoomId(5), fetch: fetch5, deltas: vec![delta(5, 1)], more: false };
    core.completion(&mut io, Completion(vec![late, Effect::Release { to: who5, shared: true }]), now(2));
    assert!(io.seqs(1, 5).is_empty(), "nothing of a room left");
    let page6 = Effect::Page { to: who6, room: RoomId(6), fetch: fetch6, deltas: vec![], more: false };
    core.completion(&mut io, Completion(vec![page6, Effect::Release { to: who6, shared: true }]), now(2));
    let sent = io.take(1);
    let done = sent.iter().find_map(|(rid, f)| match f {
        ServerFrame::SyncDone(d) if *rid == 3 => Some(d.heads.clone()),
        _ => None,
    });
    assert_eq!(done, Some(vec![RoomCursor { room: RoomId(6), seq: Seq(1) }]), "the SYNC ends without the room left");
}

#[test]
fn shutdown_waits_for_jobs_in_flight_and_refuses_new_requests() {
    let (mut core, mut io) = core_with(&[1]);
    log_in(&mut core, &mut io, 1, &[(5, 1)]);
    let post = Post { room: RoomId(5), idempotency_key: "k".into(), text: "hi".into() };
    core.frame(&mut io, 1, raw(ClientFrame::Post(post), 3), now(1));
    let job = io.take_job();
    assert!(matches!(job, Work::Post(_)));
    core.shut_down();
    assert!(core.busy(), "a post is in flight");
    let history = History { room: RoomId(5), after: Seq(0), limit: 10 };
    core.frame(&mut io, 1, raw(ClientFrame::History(history), 4), now(1));
    assert!(io.submitted.is_empty(), "no new work once stopping");
    assert!(matches!(&io.take(1)[..], [(4, ServerFrame::Error(e))] if e.code == ErrorCode::SHUTTING_DOWN));
    let posted = chime_protocol::Posted { room: RoomId(5), seq: Seq(2), ts_ms: 0, duplicate: false };
    core.completion(
        &mut io,
        Completion(vec![
            crate::work::reply(to(1, 3), ServerFrame::Posted(posted)),
            Effect::Publish(published(5, 2..=2)),
            Effect::Release { to: to(1, 3), shared: false },
        ]),
        now(1),
    );
    assert!(!core.busy());
    let sent = io.take(1);
    assert!(matches!(sent[0], (3, ServerFrame::Posted(_))), "the acknowledged post is answered: {sent:?}");
}

#[test]
fn frames_behind_a_login_wait_for_it_and_a_second_login_is_already_authenticated() {
    let (mut core, mut io) = core_with(&[1]);
    let creds = || Credentials { user: "me".into(), password: "correct horse".into(), user_agent: "t".into() };
    assert_eq!(core.frame(&mut io, 1, raw(ClientFrame::Login(creds()), 2), now(1)), Flow::Stop);
    assert!(matches!(io.take_job(), Work::Auth(_)));
    // The loop stops decoding; once the login is done it is woken and decodes the rest.
    core.completion(&mut io, login_effects(1, 2, &[]), now(1));
    assert!(io.woken.contains(&1));
    io.take(1);
    assert_eq!(core.frame(&mut io, 1, raw(ClientFrame::Login(creds()), 3), now(1)), Flow::Continue);
    assert!(matches!(&io.take(1)[..], [(3, ServerFrame::Error(e))] if e.code == ErrorCode::ALREADY_AUTHENTICATED));
    let history = History { room: RoomId(5), after: Seq(0), limit: 10 };
    core.frame(&mut io, 1, raw(ClientFrame::History(history), 4), now(1));
    assert!(matches!(io.take_job(), Work::Shared(_)), "a request behind the login runs once it is done");
}

#[test]
fn the_shared_window_parks_the_fifth_read_until_a_slot_frees() {
    let (mut core, mut io) = core_with(&[1]);
    log_in(&mut core, &mut io, 1, &[]);
    for rid in 10..14 {
        let h = History { room: RoomId(5), after: Seq(0), limit: 10 };
        assert_eq!(core.frame(&mut io, 1, raw(ClientFrame::History(h), rid), now(1)), Flow::Continue);
    }
    let h = History { room: RoomId(5), after: Seq(0), limit: 10 };
    assert_eq!(core.frame(&mut io, 1, raw(ClientFrame::History(h), 14), now(1)), Flow::Stop, "parked");
    assert_eq!(io.submitted.len(), 4);
    core.completion(&mut io, Completion(vec![Effect::Release { to: to(1, 10), shared: true }]), now(1));
    assert_eq!(io.submitted.len(), 5, "the parked read went when a slot freed");
    assert_eq!(io.submitted[4].reply_to(), Some(to(1, 14)));
}

#[test]
fn revoking_a_session_ends_all_its_connections() {
    let (mut core, mut io) = core_with(&[1, 2]);
    log_in(&mut core, &mut io, 1, &[(5, 1)]);
    log_in(&mut core, &mut io, 2, &[(5, 1)]);
    core.completion(
        &mut io,
        Completion(vec![Effect::EndSessions { sessions: vec![SESSION], code: ErrorCode::SESSION_REVOKED }]),
        now(2),
    );
    let mut ended: Vec<Key> =
        io.goodbyes.iter().filter(|(_, c)| *c == ErrorCode::SESSION_REVOKED).map(|(k, _)| *k).collect();
    ended.sort_unstable();
    assert_eq!(ended, [1, 2]);
    core.completion(&mut io, Completion(vec![Effect::Publish(published(5, 2..=2))]), now(2));
    assert!(io.seqs(1, 5).is_empty() && io.seqs(2, 5).is_empty(), "a revoked session gets nothing more");
}

#[test]
fn a_client_that_half_closes_is_answered_then_closed() {
    let (mut core, mut io) = core_with(&[1]);
    log_in(&mut core, &mut io, 1, &[]);
    let h = History { room: RoomId(5), after: Seq(0), limit: 10 };
    core.frame(&mut io, 1, raw(ClientFrame::History(h), 3), now(1));
    core.read_closed(&mut io, 1);
    assert!(io.finished.is_empty(), "a reply is still owed");
    core.completion(&mut io, Completion(vec![Effect::Release { to: to(1, 3), shared: true }]), now(1));
    assert_eq!(io.finished, [1]);
}

#[test]
fn while_the_database_is_down_requests_are_refused_at_once() {
    let (mut core, mut io) = core_with(&[1]);
    log_in(&mut core, &mut io, 1, &[]);
    io.down = true;
    let post = Post { room: RoomId(5), idempotency_key: "k".into(), text: "hi".into() };
    core.frame(&mut io, 1, raw(ClientFrame::Post(post), 3), now(1));
    assert!(io.submitted.is_empty());
    assert!(matches!(&io.take(1)[..], [(3, ServerFrame::Error(e))] if e.code == ErrorCode::UNAVAILABLE && e.retryable));
    assert!(!core.busy());
}

#[test]
fn timeouts_and_heartbeats() {
    let (mut core, mut io) = core_with(&[1, 2]);
    core.open(ConnRef { key: 3, gen: 4 }, "127.0.0.1".parse().expect("ip"), now(0));
    log_in(&mut core, &mut io, 2, &[]);
    // Connection 3 never says HELLO: closed after the handshake deadline.
    core.tick(&mut io, now(HANDSHAKE_SECS));
    assert!(io.closed.contains(&3));
    // Connection 1 never logs in: ended at the auth deadline (30 s by default).
    core.tick(&mut io, now(31));
    assert!(io.goodbyes.contains(&(1, ErrorCode::AUTH_TIMEOUT)));
    // Connection 2 is quiet: pinged after a heartbeat, ended after three.
    let hb = Config::default().heartbeat_secs;
    core.tick(&mut io, now(1 + hb));
    assert!(io.take(2).iter().any(|(_, f)| matches!(f, ServerFrame::Ping(_))));
    core.tick(&mut io, now(1 + 3 * hb));
    assert!(io.goodbyes.contains(&(2, ErrorCode::IDLE_TIMEOUT)));
}

/// A fresh connection at key 1 (not handshaken) and what the core answered `raw`.
fn first_frame(raw: RawFrame) -> (Core, FakeIo, Vec<(u32, ServerFrame)>) {
    let mut core = Core::new(Config::default(), Instant::now());
    let mut io = FakeIo::default();
    core.open(ConnRef { key: 1, gen: 2 }, "127.0.0.1".parse().expect("ip"), now(0));
    core.frame(&mut io, 1, raw, now(0));
    let sent = io.take(1);
    (core, io, sent)
}

/// A frame of type `ty` with a body of raw bytes.
fn raw_bytes(ty: FrameType, rid: u32, body: &[u8]) -> RawFrame {
    RawFrame { ty, request_id: rid, body: Bytes::copy_from_slice(body) }
}

fn refused(sent: &[(u32, ServerFrame)]) -> (u32, ErrorCode, String) {
    match sent {
        [(rid, ServerFrame::Error(e))] => (*rid, e.code, e.message.clone()),
        other => panic!("expected one ERROR, got {other:?}"),
    }
}

#[test]
fn the_handshake_settles_on_the_newest_version_both_speak_and_states_the_limits() {
    let h = Hello { max_version: PROTOCOL_VERSION + 5, ..hello() };
    let (_core, io, sent) = first_frame(raw(ClientFrame::Hello(h), 1));
    let [(1, ServerFrame::Welcome(w))] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!(w.protocol_version, PROTOCOL_VERSION);
    assert_eq!((w.min_version, w.max_version), (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION));
    let config = Config::default();
    assert_eq!((w.limits.max_frame, w.limits.heartbeat_secs), (config.max_frame, config.heartbeat_secs));
    assert_eq!(w.limits.max_text as usize, crate::limits::MAX_TEXT);
    assert_eq!(w.limits.max_page, crate::limits::MAX_PAGE);
    assert!(io.goodbyes.is_empty());
}

#[test]
fn a_client_of_an_older_version_is_told_both_sides_versions() {
    // Version 2's HELLO: magic, version, name, version string (no range).
    let mut body = MAGIC.to_vec();
    body.extend_from_slice(&[2, 5, b'c', b'h', b'i', b'm', b'e', 1, b'1']);
    let (_core, io, sent) = first_frame(raw_bytes(FrameType::HELLO, 1, &body));
    let (rid, code, message) = refused(&sent);
    assert_eq!((rid, code), (1, ErrorCode::VERSION_UNSUPPORTED));
    assert!(message.contains("up to 2") && message.contains(&format!("{MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}")));
    assert_eq!(io.goodbyes, [(1, ErrorCode::VERSION_UNSUPPORTED)]);
    // A client whose range starts past ours.
    let h = Hello { min_version: PROTOCOL_VERSION + 1, max_version: PROTOCOL_VERSION + 2, ..hello() };
    let (_core, io, sent) = first_frame(raw(ClientFrame::Hello(h), 1));
    assert_eq!(refused(&sent).1, ErrorCode::VERSION_UNSUPPORTED);
    assert_eq!(io.goodbyes, [(1, ErrorCode::VERSION_UNSUPPORTED)]);
}

#[test]
fn a_wrong_magic_a_broken_hello_and_another_first_frame_each_end_the_connection_with_their_reason() {
    let h = Hello { magic: *b"HTTP", ..hello() };
    let (_core, io, sent) = first_frame(raw(ClientFrame::Hello(h), 1));
    let (_, code, message) = refused(&sent);
    assert_eq!(code, ErrorCode::HANDSHAKE_REQUIRED);
    assert!(message.contains("not a Chime client"), "{message}");
    assert!(!message.contains("version"), "a wrong magic is not a version problem: {message}");
    assert_eq!(io.goodbyes, [(1, ErrorCode::HANDSHAKE_REQUIRED)]);

    // The prefix decodes, the rest does not.
    let mut body = MAGIC.to_vec();
    body.extend_from_slice(&[PROTOCOL_VERSION as u8, MIN_PROTOCOL_VERSION as u8, 9, b'x']);
    let (_core, io, sent) = first_frame(raw_bytes(FrameType::HELLO, 1, &body));
    assert_eq!(refused(&sent).1, ErrorCode::BAD_FRAME);
    assert_eq!(io.goodbyes, [(1, ErrorCode::BAD_FRAME)]);
    // Too short for even the prefix.
    let (_core, io, sent) = first_frame(raw_bytes(FrameType::HELLO, 1, b"CH"));
    assert_eq!(refused(&sent).1, ErrorCode::BAD_FRAME);
    assert_eq!(io.goodbyes, [(1, ErrorCode::BAD_FRAME)]);
    // A range upside down.
    let h = Hello { min_version: PROTOCOL_VERSION, max_version: MIN_PROTOCOL_VERSION - 1, ..hello() };
    let (_core, _io, sent) = first_frame(raw(ClientFrame::Hello(h), 1));
    assert_eq!(refused(&sent).1, ErrorCode::VERSION_UNSUPPORTED);

    let (_core, io, sent) = first_frame(raw(ClientFrame::Ping(Ping { nonce: 1 }), 4));
    let (rid, code, _) = refused(&sent);
    assert_eq!((rid, code), (4, ErrorCode::HANDSHAKE_REQUIRED));
    assert_eq!(io.goodbyes, [(1, ErrorCode::HANDSHAKE_REQUIRED)]);
    // An unknown type first is the same.
    let (_core, io, _sent) = first_frame(raw_bytes(FrameType(0x7777), 4, b""));
    assert_eq!(io.goodbyes, [(1, ErrorCode::HANDSHAKE_REQUIRED)]);
}

#[test]
fn a_second_hello_and_request_id_0_are_refused_and_the_connection_goes_on() {
    let (mut core, mut io) = core_with(&[1]);
    core.frame(&mut io, 1, raw(ClientFrame::Hello(hello()), 5), now(1));
    assert_eq!(refused(&io.take(1)).1, ErrorCode::HANDSHAKE_COMPLETE);
    // Even one whose body does not decode.
    core.frame(&mut io, 1, raw_bytes(FrameType::HELLO, 6, b"junk"), now(1));
    let (rid, code, _) = refused(&io.take(1));
    assert_eq!((rid, code), (6, ErrorCode::HANDSHAKE_COMPLETE));
    core.frame(&mut io, 1, raw(ClientFrame::Ping(Ping { nonce: 9 }), 0), now(1));
    let (rid, code, _) = refused(&io.take(1));
    assert_eq!((rid, code), (0, ErrorCode::BAD_FRAME));
    // PONG answers the server's ping, whose id is 0: not refused, not answered.
    core.frame(&mut io, 1, raw(ClientFrame::Pong(Ping { nonce: 9 }), 0), now(1));
    assert!(io.take(1).is_empty());
    core.frame(&mut io, 1, raw(ClientFrame::Ping(Ping { nonce: 9 }), 7), now(1));
    assert!(matches!(io.take(1)[..], [(7, ServerFrame::Pong(Ping { nonce: 9 }))]));
    assert!(io.goodbyes.is_empty());
}

#[test]
fn whoami_is_answered_on_the_loop() {
    let (mut core, mut io) = core_with(&[1]);
    core.frame(&mut io, 1, raw(ClientFrame::Whoami(chime_protocol::Empty {}), 3), now(1));
    assert_eq!(refused(&io.take(1)).1, ErrorCode::NOT_AUTHENTICATED);
    log_in(&mut core, &mut io, 1, &[]);
    core.frame(&mut io, 1, raw(ClientFrame::Whoami(chime_protocol::Empty {}), 4), now(2));
    let sent = io.take(1);
    let [(4, ServerFrame::Identity(id))] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!((id.user_id, id.user.as_str(), id.session), (USER, "me", SESSION));
    assert!(io.submitted.is_empty(), "no job");
}

#[test]
fn a_setting_change_is_pushed_to_the_users_other_connections_only() {
    let (mut core, mut io) = core_with(&[1, 2, 3]);
    log_in(&mut core, &mut io, 1, &[]);
    log_in(&mut core, &mut io, 2, &[]);
    // A bad key or value is refused on the loop.
    let bad = chime_protocol::SetSetting { key: "media.auto_load".into(), value: "maybe".into() };
    core.frame(&mut io, 1, raw(ClientFrame::SetSetting(bad), 3), now(1));
    assert!(io.submitted.is_empty());
    assert!(matches!(&io.take(1)[..], [(3, ServerFrame::Error(e))] if e.code == ErrorCode::INVALID_ARGUMENT));

    let set = chime_protocol::SetSetting { key: "media.auto_load".into(), value: "false".into() };
    core.frame(&mut io, 1, raw(ClientFrame::SetSetting(set), 4), now(1));
    assert!(io.take_job().is_shared());
    let changed = chime_protocol::SettingChanged { version: 1, key: "media.auto_load".into(), value: "false".into() };
    let effects = vec![
        crate::work::reply(to(1, 4), ServerFrame::Setting(changed.clone())),
        Effect::PushToUser {
            user: USER,
            except: Some(to(1, 4).conn),
            frame: ServerFrame::SettingChanged(changed.clone()).reply(0),
        },
        Effect::Release { to: to(1, 4), shared: true },
    ];
    core.completion(&mut io, Completion(effects), now(1));
    assert_eq!(io.take(1), [(4, ServerFrame::Setting(changed.clone()))], "the asker gets the reply alone");
    assert_eq!(io.take(2), [(0, ServerFrame::SettingChanged(changed.clone()))]);
    assert!(io.take(3).is_empty(), "a connection not logged in as the user hears nothing");

    // A connection that closed is no longer the user's.
    core.closed(2);
    let push = Effect::PushToUser { user: USER, except: None, frame: ServerFrame::SettingChanged(changed).reply(0) };
    core.completion(&mut io, Completion(vec![push]), now(2));
    assert!(io.take(2).is_empty());
    assert_eq!(io.take(1).len(), 1, "without an exception the asker's connection is reached too");
}

#[test]
fn restores_over_the_users_rate_are_refused_with_the_wait() {
    let config = Config { restore_pages_per_sec: 10, restore_burst: 2, ..Config::default() };
    let mut core = Core::new(config, Instant::now());
    let mut io = FakeIo::default();
    core.open(ConnRef { key: 1, gen: 2 }, "127.0.0.1".parse().expect("ip"), now(0));
    core.frame(&mut io, 1, raw(ClientFrame::Hello(hello()), 1), now(0));
    io.take(1);
    log_in(&mut core, &mut io, 1, &[]);
    let restore = |order| ClientFrame::Restore(Restore { room: RoomId(5), order, cursor: Seq(0), limit: 0 });
    // An order this server does not know is refused before it costs a token.
    core.frame(&mut io, 1, raw(restore(RestoreOrder(9)), 10), now(1));
    assert_eq!(refused(&io.take(1)).1, ErrorCode::INVALID_ARGUMENT);
    for rid in 11..13 {
        core.frame(&mut io, 1, raw(restore(RestoreOrder::NEWEST_FIRST), rid), now(1));
    }
    assert_eq!(io.submitted.len(), 2, "the burst");
    core.frame(&mut io, 1, raw(restore(RestoreOrder::OLDEST_FIRST), 13), now(1));
    let sent = io.take(1);
    let [(13, ServerFrame::Error(e))] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!((e.code, e.retryable), (ErrorCode::RATE_LIMITED, true));
    let wait = e.retry_after_ms().expect("the wait is stated");
    assert!((1..=100).contains(&wait), "10 pages a second: at most 100 ms, stated {wait}");
    assert_eq!(io.submitted.len(), 2, "nothing submitted for the refused page");
}

mod files {
    //! File transfers in the core: the upload window, and the download window that acks open.
    use super::*;
    use crate::handlers::files::{CHUNK_SIZE, DOWNLOAD_WINDOW, UPLOAD_WINDOW};
    use chime_protocol::{DownloadAck, FileChunk, UploadChunk};
    use chime_storage::UploadRecord;

    fn upload(id: u64, size: u64) -> UploadRecord {
        UploadRecord {
            id,
            user: USER,
            room: RoomId(5),
            name: "f".into(),
            size,
            media_type: String::new(),
            sha256: [0; 32],
        }
    }

    fn chunk(id: u64, offset: u64) -> ClientFrame {
        ClientFrame::UploadChunk(UploadChunk { upload: id, offset, data: vec![1; 100] })
    }

    fn file_jobs(io: &mut FakeIo) -> Vec<(u64, bool)> {
        let jobs = std::mem::take(&mut io.submitted);
        jobs.iter()
            .filter_map(|w| match w {
                Work::File(f) => Some((f.order, f.chunk)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn upload_chunks_stop_decoding_at_the_window_until_one_is_written() {
        let (mut core, mut io) = core_with(&[1]);
        log_in(&mut core, &mut io, 1, &[]);
        // Not opened on this connection: refused, nothing submitted.
        core.frame(&mut io, 1, raw(chunk(9, 0), 10), now(2));
        assert!(matches!(&io.take(1)[..], [(10, ServerFrame::Error(e))] if e.code == ErrorCode::NOT_FOUND));
        assert!(io.submitted.is_empty());
        core.completion(
            &mut io,
            Completion(vec![Effect::UploadOpened { to: to(1, 11), upload: upload(9, 1 << 30) }]),
            now(2),
        );
        for i in 0..UPLOAD_WINDOW {
            let flow = core.frame(&mut io, 1, raw(chunk(9, u64::from(i) * 100), 20 + i), now(2));
            let expected = if i + 1 < UPLOAD_WINDOW { Flow::Continue } else { Flow::Stop };
            assert_eq!(flow, expected, "chunk {i}");
        }
        let jobs = file_jobs(&mut io);
        assert_eq!(jobs.len(), UPLOAD_WINDOW as usize);
        assert!(jobs.iter().all(|&(order, chunk)| order == 9 && chunk), "one upload's chunks keep one order key");
        // One written: the window has a slot, the loop is asked to decode again.
        core.completion(&mut io, Completion(vec![Effect::FileReleased { to: to(1, 20), chunk: true }]), now(2));
        assert!(io.woken.contains(&1));
        assert_eq!(core.frame(&mut io, 1, raw(chunk(9, 9999), 99), now(2)), Flow::Stop, "full again");
        // A chunk past the upload's size is refused on the loop.
        core.completion(&mut io, Completion(vec![Effect::FileReleased { to: to(1, 21), chunk: true }]), now(2));
        core.completion(
            &mut io,
            Completion(vec![Effect::UploadOpened { to: to(1, 12), upload: upload(3, 50) }]),
            now(2),
        );
        core.frame(&mut io, 1, raw(chunk(3, 0), 100), now(2));
        assert!(io
            .take(1)
            .iter()
            .any(|(r, f)| *r == 100 && matches!(f, ServerFrame::Error(e) if e.code == ErrorCode::INVALID_ARGUMENT)));
    }

    fn chunk_frames(rid: u32, from: u64, count: u64) -> Vec<Bytes> {
        (0..count)
            .map(|i| {
                let offset = from + i * u64::from(CHUNK_SIZE);
                ServerFrame::FileChunk(FileChunk { download: rid, offset, data: vec![0; 8] }).encode(0).expect("small")
            })
            .collect()
    }

    #[test]
    fn a_download_streams_in_the_bulk_class_within_its_window_and_acks_open_it() {
        let (mut core, mut io) = core_with(&[1]);
        log_in(&mut core, &mut io, 1, &[]);
        io.take(1);
        io.classes.clear();
        let chunk = u64::from(CHUNK_SIZE);
        let window = u64::from(DOWNLOAD_WINDOW);
        let end = 3 * window * chunk;
        let opened = Effect::DownloadOpened { to: to(1, 5), sha256: [1; 32], offset: 0, end };
        core.completion(&mut io, Completion(vec![opened]), now(2));
        assert_eq!(file_jobs(&mut io).len(), 1, "one read at a time");
        // The read returns a whole window: all of it goes out in the bulk class, no new read.
        let frames = chunk_frames(5, 0, window);
        core.completion(
            &mut io,
            Completion(vec![Effect::FileChunks { to: to(1, 5), frames, next: window * chunk }]),
            now(2),
        );
        assert_eq!(io.classes.remove(&1).unwrap_or_default(), vec![Class::Bulk; window as usize]);
        assert!(file_jobs(&mut io).is_empty(), "the window is full until the client acks");
        assert_eq!(io.take(1).len(), window as usize);
        // The client acks half: the next read goes.
        let ack = ClientFrame::DownloadAck(DownloadAck { download: 5, received: window / 2 * chunk });
        assert_eq!(core.frame(&mut io, 1, raw(ack, 6), now(2)), Flow::Continue);
        assert!(io.take(1).is_empty(), "an ack is not answered");
        assert_eq!(file_jobs(&mut io).len(), 1);
        // An ack past what was sent opens no more than was sent.
        let greedy = ClientFrame::DownloadAck(DownloadAck { download: 5, received: u64::MAX });
        core.frame(&mut io, 1, raw(greedy, 7), now(2));
        assert!(file_jobs(&mut io).is_empty(), "a read is already out");
        // The last chunk ends the download: later acks start nothing.
        let frames = chunk_frames(5, window * chunk, 1);
        core.completion(&mut io, Completion(vec![Effect::FileChunks { to: to(1, 5), frames, next: end }]), now(2));
        let ack = ClientFrame::DownloadAck(DownloadAck { download: 5, received: end });
        core.frame(&mut io, 1, raw(ack, 8), now(2));
        assert!(file_jobs(&mut io).is_empty());
    }

    #[test]
    fn chat_replies_go_out_in_their_own_class_while_a_download_streams() {
        let (mut core, mut io) = core_with(&[1]);
        log_in(&mut core, &mut io, 1, &[(5, 1)]);
        io.take(1);
        io.classes.clear();
        let end = 4 * u64::from(CHUNK_SIZE);
        core.completion(
            &mut io,
            Completion(vec![Effect::DownloadOpened { to: to(1, 5), sha256: [1; 32], offset: 0, end }]),
            now(2),
        );
        let frames = chunk_frames(5, 0, 2);
        core.completion(
            &mut io,
            Completion(vec![Effect::FileChunks { to: to(1, 5), frames, next: 2 * u64::from(CHUNK_SIZE) }]),
            now(2),
        );
        core.completion(&mut io, Completion(vec![Effect::Publish(published(5, 2..=2))]), now(2));
        // The transport lets the published push overtake the bulk frames (see transport's test).
        assert_eq!(io.classes.remove(&1).unwrap_or_default(), vec![Class::Bulk, Class::Bulk, Class::Shared]);
    }

    #[test]
    fn downloads_together_stay_within_half_the_outbound_limit() {
        let config = Config { max_outbound_bytes: 1 << 20, ..Config::default() };
        let mut core = Core::new(config, Instant::now());
        let mut io = FakeIo::default();
        core.open(ConnRef { key: 1, gen: 2 }, "127.0.0.1".parse().expect("ip"), now(0));
        core.frame(&mut io, 1, raw(ClientFrame::Hello(hello()), 1), now(0));
        log_in(&mut core, &mut io, 1, &[]);
        let end = 100 * u64::from(CHUNK_SIZE);
        for rid in [5, 6] {
            let opened = Effect::DownloadOpened { to: to(1, rid), sha256: [1; 32], offset: 0, end };
            core.completion(&mut io, Completion(vec![opened]), now(2));
        }
        // The first download's read takes the half (512 KiB); the second waits, not over it.
        assert_eq!(file_jobs(&mut io).len(), 1);
        let frames = chunk_frames(5, 0, 8);
        let next = 8 * u64::from(CHUNK_SIZE);
        core.completion(&mut io, Completion(vec![Effect::FileChunks { to: to(1, 5), frames, next }]), now(2));
        // The next read is the other download's: they take turns.
        assert_eq!(file_jobs(&mut io), [((2 << 20) ^ 6, false)]);
        // The tick retries downloads nobody acks, without a second read for one already out.
        core.tick(&mut io, now(3));
        assert!(file_jobs(&mut io).is_empty());
    }
}
