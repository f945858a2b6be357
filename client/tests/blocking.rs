//! The blocking client against scripted in-test servers on loopback: request/reply matching with
//! interleaved pushes, PING answering, paging, errors, GOODBYE, timeouts, and TLS pinning.
#![allow(clippy::unwrap_used)]

mod util;

use chime_client::blocking::{Client, ClientError, ConnectOptions};
use chime_client::fingerprint_hex;
use chime_protocol::frame::encode;
use chime_protocol::*;
use std::io::Read;
use std::net::TcpListener;
use std::thread::{self, JoinHandle};
use std::time::Duration;
use util::*;

fn opts(addr: &str) -> ConnectOptions {
    let mut o = ConnectOptions::new(addr, false);
    o.timeout = Duration::from_secs(5);
    o
}

#[test]
fn replies_match_requests_around_pushes_and_pings() {
    let (addr, server) = plain_server(|mut p| {
        p.handshake();

        // POST: a PING and a push arrive before the reply.
        let (id, f) = p.read();
        assert!(matches!(f, ClientFrame::Post(ref post) if post.room == 1 && post.text == "hi"));
        p.send(0, &ServerFrame::Ping(Ping { nonce: 42 }));
        p.send(0, &ServerFrame::Delta(delta(1, 1, "hi")));
        p.send(id, &ServerFrame::Posted(Posted { room: RoomId(1), seq: Seq(1), ts_ms: 5, duplicate: false }));
        let (pong_id, pong) = p.read();
        assert_eq!((pong_id, pong), (0, ClientFrame::Pong(Ping { nonce: 42 })));

        // Two requests in flight, answered out of order.
        let (a, fa) = p.read();
        let (b, fb) = p.read();
        assert_eq!(fa, ClientFrame::ListRooms(ListRooms::default()));
        assert!(matches!(fb, ClientFrame::Ping(_)));
        let ClientFrame::Ping(ping) = fb else { unreachable!() };
        p.send(b, &ServerFrame::Pong(ping));
        p.send(a, &ServerFrame::RoomList(RoomList { rooms: vec![], next_after: None }));

        // An ERROR reply.
        let (id, f) = p.read();
        assert_eq!(f, ClientFrame::JoinRoom(RoomRef { room: RoomId(9) }));
        p.send(id, &ServerFrame::Error(ErrorBody::new(ErrorCode::NOT_FOUND, "no room 9")));

        // Member pages.
        let member = |id: u64| MemberInfo { user_id: UserId(id), user: format!("u{id}"), role: "member".into() };
        let (id, f) = p.read();
        assert_eq!(f, ClientFrame::ListMembers(ListMembers { room: RoomId(1), after_user: UserId(0), limit: 500 }));
        let page = MemberList { room: RoomId(1), members: vec![member(1), member(2)], next_after: Some(UserId(2)) };
        p.send(id, &ServerFrame::MemberList(page));
        let (id, f) = p.read();
        assert_eq!(f, ClientFrame::ListMembers(ListMembers { room: RoomId(1), after_user: UserId(2), limit: 500 }));
        p.send(
            id,
            &ServerFrame::MemberList(MemberList { room: RoomId(1), members: vec![member(3)], next_after: None }),
        );

        // SYNC in two pages with a live push in between.
        let (id, f) = p.read();
        assert_eq!(
            f,
            ClientFrame::Sync(Sync { rooms: vec![RoomCursor { room: RoomId(1), seq: Seq(1) }], page_size: 2 })
        );
        let page1 = DeltaPage {
            room: RoomId(1),
            deltas: vec![delta(1, 2, "b"), delta(1, 3, "c")],
            more: true,
            resume_after: Seq(3),
        };
        p.send(id, &ServerFrame::DeltaPage(page1));
        // Live pushes for rooms outside the SYNC may arrive between its pages.
        p.send(0, &ServerFrame::Delta(delta(2, 9, "other room")));
        let page2 = DeltaPage { room: RoomId(1), deltas: vec![delta(1, 4, "d")], more: false, resume_after: Seq(4) };
        p.send(id, &ServerFrame::DeltaPage(page2));
        p.send(id, &ServerFrame::SyncDone(SyncDone { heads: vec![RoomCursor { room: RoomId(1), seq: Seq(4) }] }));

        // An unknown frame type, then a push that must still be readable, then GOODBYE.
        p.send_raw(&encode(FrameType(0x8fff), 0, &Empty {}).unwrap());
        p.send(0, &ServerFrame::Delta(delta(1, 6, "after")));
        let bye = Goodbye { code: ErrorCode::IDLE_TIMEOUT, message: "idle".into(), resync: false };
        p.send(0, &ServerFrame::Goodbye(bye));
    });

    let mut c = Client::connect(&opts(&addr)).unwrap();
    assert_eq!(c.welcome(), &welcome());
    assert_eq!(c.server_fingerprint(), None);

    let posted = c.post(1, "k1", "hi").unwrap();
    assert_eq!(posted.seq, 1);
    let (id, push) = c.recv(Some(Duration::from_secs(2))).unwrap().unwrap();
    assert_eq!((id, push), (0, ServerFrame::Delta(delta(1, 1, "hi"))));

    let list_id = c.send(&ClientFrame::ListRooms(ListRooms::default())).unwrap();
    c.ping().unwrap();
    assert_eq!(
        c.recv(Some(Duration::from_secs(2))).unwrap(),
        Some((list_id, ServerFrame::RoomList(RoomList { rooms: vec![], next_after: None })))
    );

    let err = c.join_room(9).unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::NOT_FOUND));
    assert!(!err.is_retryable());

    let members = c.members(1).unwrap();
    assert_eq!(members.iter().map(|m| m.user_id).collect::<Vec<_>>(), vec![1, 2, 3]);

    let mut got = Vec::new();
    let done = c.sync(&[RoomCursor { room: RoomId(1), seq: Seq(1) }], 2, &mut |d| got.push(d.seq.get())).unwrap();
    assert_eq!(got, vec![2, 3, 4]);
    assert_eq!(done.heads, vec![RoomCursor { room: RoomId(1), seq: Seq(4) }]);
    assert_eq!(c.recv(Some(Duration::from_secs(2))).unwrap(), Some((0, ServerFrame::Delta(delta(2, 9, "other room")))));

    assert!(matches!(
        c.recv(Some(Duration::from_secs(2))),
        Err(ClientError::Decode(DecodeError::UnknownType(FrameType(0x8fff))))
    ));
    assert_eq!(c.recv(Some(Duration::from_secs(2))).unwrap(), Some((0, ServerFrame::Delta(delta(1, 6, "after")))));
    match c.recv(Some(Duration::from_secs(2))) {
        Err(ClientError::Closed(Some(g))) => assert_eq!(g.code, ErrorCode::IDLE_TIMEOUT),
        other => panic!("expected GOODBYE, got {other:?}"),
    }
    server.join().unwrap();
    assert!(matches!(c.recv(Some(Duration::from_secs(2))), Err(ClientError::Closed(None))));
}

#[test]
fn recv_and_request_time_out() {
    let (addr, server) = plain_server(|mut p| {
        p.handshake();
        // Read the unanswered PING, then wait for the client to hang up.
        let _ = p.read();
        let mut rest = Vec::new();
        let _ = p.stream.read_to_end(&mut rest);
    });
    let mut o = opts(&addr);
    o.timeout = Duration::from_millis(200);
    let mut c = Client::connect(&o).unwrap();
    assert_eq!(c.recv(Some(Duration::ZERO)).unwrap(), None);
    assert_eq!(c.recv(Some(Duration::from_millis(50))).unwrap(), None);
    let err = c.ping().unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
    assert!(err.is_retryable());
    drop(c);
    server.join().unwrap();
}

#[test]
fn refused_handshake_reports_the_servers_error() {
    let (addr, server) = plain_server(|mut p| {
        let (_, f) = p.read();
        assert!(matches!(f, ClientFrame::Hello(_)));
        // Refusals may carry request id 0; the client must still report the ERROR.
        p.send(0, &ServerFrame::Error(ErrorBody::new(ErrorCode::VERSION_UNSUPPORTED, "speak 2")));
        let bye = Goodbye { code: ErrorCode::VERSION_UNSUPPORTED, message: "speak 2".into(), resync: false };
        p.send(0, &ServerFrame::Goodbye(bye));
    });
    let err = Client::connect(&opts(&addr)).unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::VERSION_UNSUPPORTED), "{err:?}");
    server.join().unwrap();
}

#[test]
fn oversized_frame_from_server_is_a_decode_error() {
    let (addr, server) = plain_server(|mut p| {
        p.handshake();
        p.send_raw(&[0xff, 0xff, 0xff, 0xff]);
        let mut rest = Vec::new();
        let _ = p.stream.read_to_end(&mut rest);
    });
    let mut c = Client::connect(&opts(&addr)).unwrap();
    let err = c.recv(Some(Duration::from_secs(2))).unwrap_err();
    assert!(matches!(err, ClientError::Decode(DecodeError::TooLarge { .. })), "{err:?}");
    drop(c);
    server.join().unwrap();
}

/// A push that arrives before the caller follows its room (right after the login, say) must not
/// jump ahead of the catch-up: `tail` printed seq 594 before 1..593 when posts went on while it
/// reconnected.
#[test]
fn a_push_read_before_its_room_is_followed_does_not_jump_ahead() {
    let (addr, server) = plain_server(|mut p| {
        p.handshake();
        let (id, f) = p.read();
        assert!(matches!(f, ClientFrame::Ping(_)), "{f:?}");
        p.send(0, &ServerFrame::Delta(delta(1, 3, "c")));
        p.send(id, &ServerFrame::Pong(Ping { nonce: 1 }));
        let (id, f) = p.read();
        assert_eq!(
            f,
            ClientFrame::Sync(Sync { rooms: vec![RoomCursor { room: RoomId(1), seq: Seq(0) }], page_size: 500 })
        );
        let deltas = vec![delta(1, 1, "a"), delta(1, 2, "b"), delta(1, 3, "c")];
        p.send(id, &ServerFrame::DeltaPage(DeltaPage { room: RoomId(1), deltas, more: false, resume_after: Seq(3) }));
        p.send(id, &ServerFrame::SyncDone(SyncDone { heads: vec![RoomCursor { room: RoomId(1), seq: Seq(3) }] }));
        p.send(0, &ServerFrame::Delta(delta(1, 4, "d")));
    });
    let mut c = Client::connect(&opts(&addr)).unwrap();
    c.ping().unwrap();
    c.follow(1, 0);
    // The early push shows a gap after 0, so the session already SYNCs the room: nothing is left
    // for this call to sync, but it sends what the session queued.
    assert_eq!(c.sync_followed().unwrap(), None);
    let mut seqs = Vec::new();
    while seqs.last() != Some(&4) {
        match c.next_event(Some(Duration::from_secs(5))).unwrap() {
            Some(chime_client::Event::Delta { delta, .. }) => seqs.push(delta.seq.get()),
            Some(_) => {}
            None => panic!("stopped after {seqs:?}"),
        }
    }
    assert_eq!(seqs, [1, 2, 3, 4]);
    server.join().unwrap();
}

/// The same with the pushes in the read that brought the reply: they wait inside the session,
/// not in the client's queue, when the caller follows (CI saw `tail` print 7, 8 before 1..=8).
#[test]
fn pushes_read_with_a_reply_do_not_jump_ahead_either() {
    let (addr, server) = plain_server(|mut p| {
        p.handshake();
        let (id, f) = p.read();
        assert!(matches!(f, ClientFrame::Ping(_)), "{f:?}");
        let mut bytes = ServerFrame::Pong(Ping { nonce: 1 }).encode(id).unwrap().to_vec();
        for seq in [2, 3] {
            bytes.extend_from_slice(&ServerFrame::Delta(delta(1, seq, "x")).encode(0).unwrap());
        }
        p.send_raw(&bytes);
        let (id, f) = p.read();
        assert_eq!(
            f,
            ClientFrame::Sync(Sync { rooms: vec![RoomCursor { room: RoomId(1), seq: Seq(0) }], page_size: 500 })
        );
        let deltas = vec![delta(1, 1, "a"), delta(1, 2, "b"), delta(1, 3, "c")];
        p.send(id, &ServerFrame::DeltaPage(DeltaPage { room: RoomId(1), deltas, more: false, resume_after: Seq(3) }));
        p.send(id, &ServerFrame::SyncDone(SyncDone { heads: vec![RoomCursor { room: RoomId(1), seq: Seq(3) }] }));
    });
    let mut c = Client::connect(&opts(&addr)).unwrap();
    c.ping().unwrap();
    c.follow(1, 0);
    assert_eq!(c.sync_followed().unwrap(), None);
    let mut seqs = Vec::new();
    while seqs.last() != Some(&3) {
        match c.next_event(Some(Duration::from_secs(5))).unwrap() {
            Some(chime_client::Event::Delta { delta, .. }) => seqs.push(delta.seq.get()),
            Some(_) => {}
            None => panic!("stopped after {seqs:?}"),
        }
    }
    assert_eq!(seqs, [1, 2, 3]);
    server.join().unwrap();
}

#[test]
fn followed_rooms_are_delivered_once_in_order_and_gaps_filled() {
    let (addr, server) = plain_server(|mut p| {
        p.handshake();
        let (id, f) = p.read();
        assert_eq!(
            f,
            ClientFrame::Sync(Sync { rooms: vec![RoomCursor { room: RoomId(1), seq: Seq(0) }], page_size: 500 })
        );
        let page = DeltaPage {
            room: RoomId(1),
            deltas: vec![delta(1, 1, "a"), delta(1, 2, "b")],
            more: false,
            resume_after: Seq(2),
        };
        p.send(id, &ServerFrame::DeltaPage(page));
        p.send(id, &ServerFrame::SyncDone(SyncDone { heads: vec![RoomCursor { room: RoomId(1), seq: Seq(2) }] }));
        p.send(0, &ServerFrame::Delta(delta(1, 3, "c")));
        p.send(0, &ServerFrame::Delta(delta(1, 5, "e"))); // 4 was lost
                                                          // The session asks for what is missing by itself.
        let (id, f) = p.read();
        assert_eq!(
            f,
            ClientFrame::Sync(Sync { rooms: vec![RoomCursor { room: RoomId(1), seq: Seq(3) }], page_size: 500 })
        );
        let page = DeltaPage {
            room: RoomId(1),
            deltas: vec![delta(1, 4, "d"), delta(1, 5, "e")],
            more: false,
            resume_after: Seq(5),
        };
        p.send(id, &ServerFrame::DeltaPage(page));
        p.send(id, &ServerFrame::SyncDone(SyncDone { heads: vec![RoomCursor { room: RoomId(1), seq: Seq(5) }] }));
        p.send(0, &ServerFrame::Delta(delta(1, 5, "e"))); // a duplicate
        p.send(0, &ServerFrame::Delta(delta(1, 6, "f")));
    });
    let mut c = Client::connect(&opts(&addr)).unwrap();
    c.follow(1, 0);
    let sync_id = c.sync_followed().unwrap().unwrap();
    let (mut seqs, mut gaps, mut done) = (Vec::new(), 0, false);
    while seqs.last() != Some(&6) {
        match c.next_event(Some(Duration::from_secs(5))).unwrap() {
            Some(chime_client::Event::Delta { delta, .. }) => seqs.push(delta.seq.get()),
            Some(chime_client::Event::Gap { room: RoomId(1), cursor: Seq(3), seq: Seq(5), resync: Some(_) }) => {
                gaps += 1
            }
            Some(chime_client::Event::Reply { request_id, frame: ServerFrame::SyncDone(_) }) => {
                assert_eq!(request_id, sync_id, "only the caller's SYNC is reported");
                done = true;
            }
            Some(_) => {}
            None => panic!("stopped after {seqs:?}"),
        }
    }
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    assert_eq!((gaps, done), (1, true));
    assert_eq!(c.session().cursor(1), Some(Seq(6)));
    server.join().unwrap();
}

#[test]
fn a_silent_server_is_pinged_then_given_up_on() {
    let (addr, server) = plain_server(|mut p| {
        let (id, _) = p.read();
        p.send(
            id,
            &ServerFrame::Welcome(Welcome { limits: Limits { heartbeat_secs: 1, ..Limits::default() }, ..welcome() }),
        );
        // The client pings after a second of silence; no answer comes.
        let (_, f) = p.read();
        assert!(matches!(f, ClientFrame::Ping(_)), "expected the heartbeat PING, got {f:?}");
        let mut rest = Vec::new();
        let _ = p.stream.read_to_end(&mut rest);
    });
    let mut c = Client::connect(&opts(&addr)).unwrap();
    let started = std::time::Instant::now();
    let err = c.recv(Some(Duration::from_secs(10))).unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
    assert!(waited >= Duration::from_millis(2900) && waited < Duration::from_secs(5), "gave up after {waited:?}");
    drop(c);
    server.join().unwrap();
}

mod tls {
    use super::*;
    use rustls::{ServerConnection, StreamOwned};

    struct TlsServer {
        addr: String,
        fingerprint: [u8; 32],
        handle: JoinHandle<()>,
    }

    /// A TLS server that answers the handshake on `conns` connections, one after the other.
    /// Connections whose TLS handshake fails (a refused pin) are skipped.
    fn tls_server(conns: usize, versions: &[&'static rustls::SupportedProtocolVersion]) -> TlsServer {
        let (config, fingerprint) = tls_config(versions);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = thread::spawn(move || {
            for _ in 0..conns {
                let (tcp, _) = listener.accept().unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut tls = StreamOwned::new(ServerConnection::new(config.clone()).unwrap(), tcp);
                // The handshake completes on the first read; a client refusing the pin shows up
                // here as an error, which ends this connection.
                let mut first = [0u8; 1];
                if tls.read_exact(&mut first).is_err() {
                    continue;
                }
                let mut p = Peer::new(tls);
                p.buf.extend_from_slice(&first);
                p.handshake();
                let (id, f) = p.read();
                let ClientFrame::Ping(ping) = f else { panic!("expected PING, got {f:?}") };
                p.send(id, &ServerFrame::Pong(ping));
                // A frame far larger than rustls' 64 KiB send buffer.
                let (id, f) = p.read();
                let ClientFrame::Post(post) = f else { panic!("expected POST, got {f:?}") };
                assert_eq!(post.text.len(), BIG_TEXT);
                p.send(id, &ServerFrame::Posted(Posted { room: post.room, seq: Seq(2), ts_ms: 0, duplicate: false }));
            }
        });
        TlsServer { addr, fingerprint, handle }
    }

    const BIG_TEXT: usize = 300 * 1024;

    fn ping_and_big_post(c: &mut Client) {
        c.ping().unwrap();
        let posted = c.post(1, &chime_client::new_idempotency_key(), &"x".repeat(BIG_TEXT)).unwrap();
        assert_eq!(posted.seq, 2);
    }

    fn tls_opts(addr: &str, pin: Option<[u8; 32]>) -> ConnectOptions {
        let mut o = ConnectOptions::new(addr, true);
        o.timeout = Duration::from_secs(5);
        o.pinned_fingerprint = pin;
        o
    }

    fn pin_flow(versions: &[&'static rustls::SupportedProtocolVersion]) {
        let server = tls_server(2, versions);

        // First use: no pin, the fingerprint seen is the certificate's.
        let mut c = Client::connect(&tls_opts(&server.addr, None)).unwrap();
        assert_eq!(c.server_fingerprint(), Some(server.fingerprint));
        ping_and_big_post(&mut c);
        drop(c);

        // Later use with the right pin.
        let mut c = Client::connect(&tls_opts(&server.addr, Some(server.fingerprint))).unwrap();
        ping_and_big_post(&mut c);
        drop(c);
        server.handle.join().unwrap();
    }

    #[test]
    fn pin_matches_tls13() {
        pin_flow(&[&rustls::version::TLS13]);
    }

    #[test]
    fn pin_matches_tls12() {
        pin_flow(&[&rustls::version::TLS12]);
    }

    #[test]
    fn pin_mismatch_is_refused() {
        let server = tls_server(1, rustls::DEFAULT_VERSIONS);
        let wrong = [0xabu8; 32];
        match Client::connect(&tls_opts(&server.addr, Some(wrong))) {
            Err(ClientError::FingerprintMismatch { expected, got }) => {
                assert_eq!(expected, fingerprint_hex(&wrong));
                assert_eq!(got, fingerprint_hex(&server.fingerprint));
            }
            other => panic!("expected FingerprintMismatch, got {other:?}"),
        }
        server.handle.join().unwrap();
    }
}
