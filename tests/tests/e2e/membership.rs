//! (f) A non-member can neither post, read history, nor sync a room, and gets none of its pushes.

use crate::util::*;
use chime_client::blocking::ClientError;
use chime_protocol::{ClientFrame, ErrorCode, RoomCursor, Seq, ServerFrame, Sync};
use chime_tests::daemon::{Backend, Daemon};
use std::time::{Duration, Instant};

on_both_stores!(non_member_is_refused);

fn non_member_is_refused(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "membership", &[]) else { return };
    let mut owner = d.register("owner");
    let room = owner.client.create_room("private-ish").expect("create").room;
    owner.client.post(room, &chime_client::new_idempotency_key(), "secret").expect("post");
    let mut outsider = d.user("outsider");

    let key = chime_client::new_idempotency_key();
    assert_eq!(server_code("POST", outsider.post(room, &key, "let me in")), ErrorCode::NOT_MEMBER);
    assert_eq!(server_code("HISTORY", outsider.history(room, 0, 50)), ErrorCode::NOT_MEMBER);
    // SYNC either refuses the room or leaves it out; either way nothing of it is sent.
    let id = outsider
        .send(&ClientFrame::Sync(Sync { rooms: vec![RoomCursor { room, seq: Seq(0) }], page_size: 50 }))
        .expect("send SYNC");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no answer to SYNC");
        match outsider.recv(Some(Duration::from_millis(500))) {
            Ok(Some((rid, ServerFrame::Error(e)))) if rid == id => {
                assert_eq!(e.code, ErrorCode::NOT_MEMBER);
                break;
            }
            Ok(Some((rid, ServerFrame::SyncDone(done)))) if rid == id => {
                assert!(done.heads.iter().all(|c| c.room != room), "SYNC_DONE names a foreign room: {done:?}");
                break;
            }
            Ok(Some((rid, ServerFrame::DeltaPage(p)))) if rid == id => {
                assert!(p.deltas.is_empty() || p.room != room, "SYNC leaked deltas of a foreign room: {p:?}");
            }
            Ok(_) => {}
            Err(e) => panic!("SYNC: {e:?}"),
        }
    }
    assert!(outsider.list_rooms().expect("rooms").iter().all(|r| r.room != room));

    // No pushes: post a few more and listen.
    for n in 0..3 {
        owner.client.post(room, &chime_client::new_idempotency_key(), &format!("more {n}")).expect("post");
    }
    let until = Instant::now() + Duration::from_millis(800);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match outsider.recv(Some(left)) {
            Ok(Some((_, ServerFrame::Delta(d)))) => panic!("non-member got a push: {d:?}"),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(ClientError::Timeout) => break,
            Err(e) => panic!("outsider's connection failed: {e:?}"),
        }
    }
    // Still usable, and joining makes it work.
    outsider.join_room(room).expect("join");
    assert!(outsider.history(room, 0, 50).expect("history").deltas.iter().any(|d| d.text() == "secret"));
}
