//! (g) Hostile bytes (garbage, an oversized length, a half frame then silence, a frame before
//! HELLO, an unknown type, a malformed body) crash nothing and do not disturb a chat going on at
//! the same time; the daemon keeps accepting connections.

use crate::util::*;
use chime_protocol::{ClientFrame, ErrorCode, FrameType, Ping, ServerFrame};
use chime_tests::daemon::{Backend, Daemon};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

on_both_stores!(hostile_bytes_do_not_disturb_others);

fn hostile_bytes_do_not_disturb_others(backend: Backend) {
    let Some(mut d) = Daemon::start_backend(backend, "hostile", &[]) else { return };
    let mut alice = d.register("alice");
    let mut bob = d.register("bob");
    let room = alice.client.create_room("calm").expect("create").room;
    bob.client.join_room(room).expect("join");
    let addr = d.plaintext_addr();
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        // The chat: alice posts steadily, bob must receive every message.
        let chat = s.spawn(|| {
            let mut sent = Vec::new();
            while !stop.load(Ordering::SeqCst) && sent.len() < 500 {
                let key = chime_client::new_idempotency_key();
                let p = alice.client.post(room, &key, &format!("calm {}", sent.len())).expect("chat post");
                sent.push(p.seq.get());
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        });

        // Garbage: the length prefix reads as enormous; the server must refuse and close.
        let mut garbage = RawConn::connect(addr);
        let _ = garbage.write(&[0xff; 64]);
        garbage.until_closed(Duration::from_secs(5));

        // A frame before HELLO: ERROR HANDSHAKE_REQUIRED, then close.
        let mut early = RawConn::connect(addr);
        early.send(&ClientFrame::Ping(Ping { nonce: 1 }), 7);
        let frames = early.until_closed(Duration::from_secs(5));
        assert!(
            frames.iter().any(|f| error_code(f) == Some(ErrorCode::HANDSHAKE_REQUIRED)),
            "no HANDSHAKE_REQUIRED before close: {frames:?}"
        );

        // An oversized length after the handshake: an ERROR, then close.
        let mut big = RawConn::connect(addr);
        big.handshake();
        let _ = big.write(&[0x7f, 0xff, 0xff, 0xff, 0x00, 0x02, 0, 0, 0, 9]);
        let frames = big.until_closed(Duration::from_secs(5));
        assert!(
            frames.iter().any(|f| f.ty == FrameType::ERROR),
            "no ERROR before closing an oversized frame: {frames:?}"
        );

        // A length under the 6 bytes it must cover: ERROR, then close.
        let mut short = RawConn::connect(addr);
        short.handshake();
        let _ = short.write(&[0, 0, 0, 2, 0, 2]);
        short.until_closed(Duration::from_secs(5));

        // Half a frame, then silence: held open while everything else goes on.
        let mut half = RawConn::connect(addr);
        half.handshake();
        let ping = ClientFrame::Ping(Ping { nonce: 5 }).encode(3).expect("small frame");
        half.write(&ping[..ping.len() - 3]).expect("half write");

        // An unknown type and a malformed body: ERRORs, and the connection goes on.
        let mut odd = RawConn::connect(addr);
        odd.handshake();
        odd.write(&[0, 0, 0, 6, 0x77, 0x77, 0, 0, 0, 11]).expect("write");
        expect_error(&mut odd, 11, ErrorCode::UNKNOWN_TYPE);
        // A POST whose body is a single byte cannot decode.
        odd.write(&[0, 0, 0, 7, 0x00, 0x30, 0, 0, 0, 12, 0xff]).expect("write");
        expect_error(&mut odd, 12, ErrorCode::BAD_FRAME);
        odd.send(&ClientFrame::Ping(Ping { nonce: 99 }), 13);
        loop {
            match odd.recv(Duration::from_secs(5)) {
                Got::Frame(f) if f.ty == FrameType::SERVER_PONG => {
                    assert_eq!(f.request_id, 13);
                    assert_eq!(ServerFrame::decode(&f), Ok(ServerFrame::Pong(Ping { nonce: 99 })));
                    break;
                }
                Got::Frame(_) => {}
                other => panic!("no PONG after the bad frames: {other:?}"),
            }
        }

        // Many connections that open and vanish mid-handshake.
        for _ in 0..50 {
            let mut c = RawConn::connect(addr);
            let _ = c.write(&[0, 0, 0, 40, 0, 1]);
        }

        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        drop(half);
        chat.join().expect("chat thread")
    });
    assert!(!sent.is_empty());
    let last = *sent.last().expect("posted");
    let got = pushes_until(&mut bob.client, room, last, Duration::from_secs(10));
    let seqs: Vec<u64> = got.iter().filter(|d| d.seq >= sent[0]).map(|d| d.seq.get()).collect();
    assert_contiguous("bob's pushes during the attack", &seqs, sent[0], last);
    assert!(d.is_running(), "chimed died");
    let mut fresh = d.user("fresh");
    fresh.ping().expect("a new connection works");
}

fn expect_error(conn: &mut RawConn, request_id: u32, code: ErrorCode) {
    loop {
        match conn.recv(Duration::from_secs(5)) {
            Got::Frame(f) if f.ty == FrameType::ERROR => {
                assert_eq!((f.request_id, error_code(&f)), (request_id, Some(code)), "{f:?}");
                return;
            }
            Got::Frame(_) => {}
            other => panic!("expected ERROR {code} for request {request_id}, got {other:?}"),
        }
    }
}
