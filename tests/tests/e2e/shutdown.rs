//! SIGTERM: the daemon answers what is in flight, says GOODBYE (SHUTTING_DOWN) to every client,
//! exits 0 within 10 s, and every acknowledged post is in the log after a restart.

use crate::util::*;
use chime_client::blocking::ClientError;
use chime_protocol::{ClientFrame, ErrorCode, Post, ServerFrame};
use chime_tests::daemon::{Backend, Daemon};
use std::time::{Duration, Instant};

on_both_stores!(sigterm_drains_and_says_goodbye);

fn sigterm_drains_and_says_goodbye(backend: Backend) {
    let Some(mut d) = Daemon::start_backend(backend, "shutdown", &[]) else { return };
    let mut alice = d.register("alice");
    let room = alice.client.create_room("closing time").expect("create").room;
    let mut bob = d.register("bob");
    bob.client.join_room(room).expect("join");

    // Pipeline a burst of posts without waiting, then stop the daemon while they are in flight.
    const BURST: u32 = 200;
    let mut ids = Vec::new();
    for i in 0..BURST {
        let post = Post { room, idempotency_key: chime_client::new_idempotency_key(), text: format!("burst {i}") };
        ids.push(alice.client.send(&ClientFrame::Post(post)).expect("send"));
    }
    d.stop();

    // Everything alice hears before the GOODBYE: acks for some (maybe all) posts, or a
    // retryable SHUTTING_DOWN error for the ones that came too late.
    let mut acked = Vec::new();
    let mut goodbye = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match alice.client.recv(Some(Duration::from_millis(500))) {
            Ok(Some((_, ServerFrame::Posted(p)))) => acked.push(p.seq.get()),
            Ok(Some((_, ServerFrame::Error(e)))) => {
                assert_eq!(e.code, ErrorCode::SHUTTING_DOWN, "unexpected error {e:?}");
                assert!(e.retryable);
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(ClientError::Closed(g)) => {
                goodbye = g;
                break;
            }
            Err(e) => panic!("unexpected client error {e:?}"),
        }
    }
    let goodbye = goodbye.expect("a GOODBYE before the close");
    assert_eq!(goodbye.code, ErrorCode::SHUTTING_DOWN);

    d.restart();
    let mut alice = d.resume(&alice.token);
    let history = history_all(&mut alice, room);
    for seq in &acked {
        let delta = history.iter().find(|x| x.seq == *seq);
        assert!(delta.is_some_and(|x| x.text().starts_with("burst ")), "acked seq {seq} missing after restart");
    }
    let seqs: Vec<u64> = history.iter().map(|x| x.seq.get()).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "the log has a gap");
}
