//! (i) A client that never reads while its room is flooded is cut off (GOODBYE RESYNC_REQUIRED
//! or a close), while a client that reads keeps receiving everything.

use crate::util::*;
use chime_client::blocking::ClientError;
use chime_protocol::{ErrorCode, ServerFrame};
use chime_tests::daemon::{Backend, Daemon};
use std::time::{Duration, Instant};

on_both_stores!(slow_consumer_is_cut_off);

fn slow_consumer_is_cut_off(backend: Backend) {
    // 21 MB in all: more than the kernel buffers of a socket that is never read plus the server's
    // 64 KiB queue. Posts go out 2 at a time, so one group commit fans out under 64 KiB per
    // connection and a client that reads keeps up.
    const POSTS: usize = 1500;
    let Some(d) = Daemon::start_backend(backend, "slow", &["--max-outbound-bytes", "65536"]) else { return };
    let mut owner = d.register("owner");
    let room = owner.client.create_room("flood").expect("create").room;
    let mut reader = d.register("reader");
    reader.client.join_room(room).expect("join");
    let mut sleeper = d.register("sleeper");
    sleeper.client.join_room(room).expect("join");
    let mut sleeper = sleeper.client;
    let start = head_seq(&mut owner.client, room);
    let texts: Vec<String> = (0..POSTS).map(|n| format!("{n:05} {}", "z".repeat(14_000))).collect();
    let end = start + POSTS as u64;
    let received = std::thread::scope(|s| {
        let reading = s.spawn(|| pushes_until(&mut reader.client, room, end, Duration::from_secs(60)));
        post_with_window(&mut owner.client, room, &texts, 2);
        reading.join().expect("reader")
    });
    let seqs: Vec<u64> = received.iter().map(|d| d.seq.get()).collect();
    let first = seqs.first().copied().unwrap_or(0);
    assert!(first <= start + 1);
    assert_contiguous("the reading client", &seqs, first, end);

    // Now read what the sleeper's socket holds: it must end in GOODBYE or a close, well short
    // of the whole flood.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut deltas = 0usize;
    let ending = loop {
        assert!(Instant::now() < deadline, "the sleeper is still connected after reading {deltas} deltas");
        match sleeper.recv(Some(Duration::from_secs(2))) {
            Ok(Some((_, ServerFrame::Delta(_)))) => deltas += 1,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the sleeper was never cut off ({deltas} deltas buffered, flood of {POSTS})"),
            Err(e) => break e,
        }
    };
    match ending {
        ClientError::Closed(Some(g)) => {
            assert_eq!(g.code, ErrorCode::RESYNC_REQUIRED, "{g:?}");
            assert!(g.resync);
        }
        ClientError::Closed(None) | ClientError::Io(_) => {}
        other => panic!("unexpected end of the sleeper's connection: {other:?}"),
    }
    assert!(deltas < POSTS, "the sleeper got the whole flood; the test did not exercise the limit");
    // The reader's connection is still fine.
    reader.client.ping().expect("reader still connected");
}
