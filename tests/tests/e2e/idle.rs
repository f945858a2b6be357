//! (j) With `--heartbeat-secs 1`, a connection that handshakes and then stays silent (answers no
//! PING) is closed within about 4 s, while a client that answers pings stays connected.

use crate::util::*;
use chime_protocol::{FrameType, ServerFrame};
use chime_tests::daemon::{Backend, Daemon};
use std::time::{Duration, Instant};

on_both_stores!(silent_connection_times_out);

fn silent_connection_times_out(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "idle", &["--heartbeat-secs", "1"]) else { return };
    let mut live = d.user("live");
    let mut silent = RawConn::connect(d.plaintext_addr());
    silent.handshake();
    let started = Instant::now();
    let (frames, closed_after) = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let frames = silent.until_closed(Duration::from_secs(8));
            (frames, started.elapsed())
        });
        // Meanwhile the blocking client reads (answering pings) for 5 s.
        while started.elapsed() < Duration::from_secs(5) {
            match live.recv(Some(Duration::from_millis(200))) {
                Ok(_) => {}
                Err(e) => panic!("a client answering pings was disconnected: {e:?}"),
            }
        }
        waiter.join().expect("waiter")
    });
    // Three silent heartbeat intervals, plus scheduling slack.
    assert!(closed_after <= Duration::from_millis(5500), "silent connection closed only after {closed_after:?}");
    assert!(frames.iter().any(|f| f.ty == FrameType::SERVER_PING), "the server never pinged: {frames:?}");
    if let Some(last) = frames.last() {
        if let Ok(ServerFrame::Goodbye(g)) = ServerFrame::decode(last) {
            assert_eq!(g.code, chime_protocol::ErrorCode::IDLE_TIMEOUT);
        }
    }
    live.ping().expect("the pinging client is still connected");
}
