//! The mio-driven connection against scripted servers on loopback: requests pipelined before the
//! WELCOME, pushes and server pings handled inside a poll loop, a frame far larger than rustls'
//! buffer over TLS, a refused pin, and the end of the stream.
#![allow(clippy::unwrap_used)]

mod util;

use chime_client::nonblocking::{Connection, TlsSetup};
use chime_client::{ClientError, Event, SessionConfig};
use chime_protocol::*;
use mio::{Events, Poll, Token};
use rustls::pki_types::ServerName;
use rustls::{ServerConnection, StreamOwned};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};
use util::*;

/// Polls `conn` until `done` holds for the events seen so far (or the connection ends); returns
/// them and how `ready` ended. Panics after 5 s.
fn drive(
    conn: &mut Connection,
    poll: &mut Poll,
    mut done: impl FnMut(&[Event]) -> bool,
) -> (Vec<Event>, Result<(), ClientError>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = Events::with_capacity(16);
    let mut seen = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "gave up waiting; events so far: {seen:?}");
        poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
        let result = conn.ready(Instant::now());
        while let Some(event) = conn.poll_event() {
            seen.push(event);
        }
        if result.is_err() || done(&seen) {
            return (seen, result);
        }
    }
}

fn connect(addr: SocketAddr, tls: Option<&TlsSetup>) -> (Connection, Poll) {
    let poll = Poll::new().unwrap();
    let mut conn = Connection::connect(addr, tls, SessionConfig::default(), Duration::from_secs(5)).unwrap();
    conn.register(poll.registry(), Token(7)).unwrap();
    (conn, poll)
}

#[test]
fn pipelined_login_pushes_pings_and_the_end_of_the_stream() {
    let (addr, server) = plain_server(|mut p| {
        p.handshake();
        let (id, f) = p.read();
        assert_eq!(f, ClientFrame::Resume(Resume { token: "tok".into(), user_agent: "test".into() }));
        p.send(id, &ServerFrame::Authed(Authed { user_id: UserId(3), user: "ann".into(), token: None }));
        p.send(0, &ServerFrame::Ping(Ping { nonce: 9 }));
        p.send(0, &ServerFrame::Delta(delta(1, 4, "hi")));
        assert_eq!(p.read(), (0, ClientFrame::Pong(Ping { nonce: 9 })));
        let (id, f) = p.read();
        assert!(matches!(f, ClientFrame::Post(_)), "{f:?}");
        p.send(id, &ServerFrame::Posted(Posted { room: RoomId(1), seq: Seq(5), ts_ms: 0, duplicate: false }));
        let bye = Goodbye { code: ErrorCode::SHUTTING_DOWN, message: "later".into(), resync: true };
        p.send(0, &ServerFrame::Goodbye(bye));
    });
    let (mut conn, mut poll) = connect(addr.parse().unwrap(), None);
    // RESUME goes out right behind the HELLO, before any answer.
    let resume = conn.send(&ClientFrame::Resume(Resume { token: "tok".into(), user_agent: "test".into() })).unwrap();
    conn.flush().unwrap();
    let (events, result) = drive(&mut conn, &mut poll, |e| e.iter().any(|e| matches!(e, Event::Delta { .. })));
    result.unwrap();
    assert!(matches!(&events[0], Event::Connected(w) if *w == welcome()));
    assert!(matches!(&events[1], Event::Reply { request_id, frame: ServerFrame::Authed(_) } if *request_id == resume));
    assert_eq!(events[2], Event::Delta { delta: delta(1, 4, "hi"), sync: None });

    let post = conn
        .send(&ClientFrame::Post(Post { room: RoomId(1), idempotency_key: "k".into(), text: "yo".into() }))
        .unwrap();
    conn.flush().unwrap();
    let (events, result) = drive(&mut conn, &mut poll, |_| false);
    assert!(
        matches!(&events[0], Event::Reply { request_id, frame: ServerFrame::Posted(p) } if *request_id == post && p.seq == 5)
    );
    assert!(matches!(&events[1], Event::Goodbye(g) if g.code == ErrorCode::SHUTTING_DOWN && g.resync));
    assert!(matches!(result, Err(ClientError::Closed(None))), "{result:?}");
    assert!(conn.is_closed());
    assert!(conn.send(&ClientFrame::Ping(Ping { nonce: 1 })).is_err());
    server.join().unwrap();
}

/// A TLS server answering one PING and one large POST per connection.
fn tls_server(conns: usize) -> (SocketAddr, [u8; 32], thread::JoinHandle<()>) {
    let (config, fingerprint) = tls_config(rustls::DEFAULT_VERSIONS);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        for _ in 0..conns {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut tls = StreamOwned::new(ServerConnection::new(config.clone()).unwrap(), tcp);
            let mut first = [0u8; 1];
            if tls.read_exact(&mut first).is_err() {
                continue; // a refused pin
            }
            let mut p = Peer::new(tls);
            p.buf.extend_from_slice(&first);
            p.handshake();
            let (id, f) = p.read();
            let ClientFrame::Post(post) = f else { panic!("expected POST, got {f:?}") };
            assert_eq!(post.text.len(), 300 * 1024);
            p.send(id, &ServerFrame::Posted(Posted { room: post.room, seq: Seq(2), ts_ms: 0, duplicate: false }));
            // Until the client hangs up.
            let _ = p.stream.read_to_end(&mut Vec::new());
        }
    });
    (addr, fingerprint, handle)
}

#[test]
fn tls_carries_a_frame_larger_than_rustls_buffers_and_pins() {
    let (addr, fingerprint, server) = tls_server(2);
    let name = ServerName::try_from("localhost").unwrap();
    for pin in [None, Some(fingerprint)] {
        let setup = TlsSetup::tofu(name.clone(), pin).unwrap();
        let (mut conn, mut poll) = connect(addr, Some(&setup));
        // Queued before the TLS handshake even started.
        let big =
            ClientFrame::Post(Post { room: RoomId(1), idempotency_key: "k".into(), text: "x".repeat(300 * 1024) });
        let id = conn.send(&big).unwrap();
        conn.flush().unwrap();
        let (events, result) = drive(&mut conn, &mut poll, |e| e.iter().any(|e| matches!(e, Event::Reply { .. })));
        result.unwrap();
        assert!(matches!(events.last(), Some(Event::Reply { request_id, .. }) if *request_id == id), "{events:?}");
        assert_eq!(conn.server_fingerprint(), Some(fingerprint));
        assert!(!conn.wants_write());
    }
    server.join().unwrap();
}

#[test]
fn a_wrong_pin_is_refused() {
    let (addr, fingerprint, server) = tls_server(1);
    let setup = TlsSetup::tofu(ServerName::try_from("localhost").unwrap(), Some([0xab; 32])).unwrap();
    let (mut conn, mut poll) = connect(addr, Some(&setup));
    conn.flush().unwrap();
    let (events, result) = drive(&mut conn, &mut poll, |_| false);
    assert!(events.is_empty(), "{events:?}");
    match result {
        Err(ClientError::FingerprintMismatch { expected, got }) => {
            assert_eq!(expected, chime_client::fingerprint_hex(&[0xab; 32]));
            assert_eq!(got, chime_client::fingerprint_hex(&fingerprint));
        }
        other => panic!("expected FingerprintMismatch, got {other:?}"),
    }
    assert!(conn.is_closed());
    server.join().unwrap();
}
