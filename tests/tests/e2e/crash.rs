//! (c) kill -9 during a burst of posts: every acknowledged post survives the restart, retries
//! with the same idempotency key never double-post, and a `chime tail` across the restart misses
//! and repeats nothing.

use crate::util::*;
use chime_client::blocking::{Client, ClientError};
use chime_tests::daemon::{Backend, Daemon};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

on_both_stores!(kill9_keeps_every_acked_post);

/// Reconnects and resumes until it works or `deadline` passes.
fn reconnect(d: &Daemon, token: &str, deadline: Instant) -> Client {
    loop {
        if let Ok(mut c) = Client::connect(&d.connect_options()) {
            if c.resume(token, "crash-test").is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "could not reconnect after the restart");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill9_keeps_every_acked_post(backend: Backend) {
    const THREADS: usize = 4;
    const EACH: usize = 150;
    let Some(mut d) = Daemon::start_backend(backend, "crash", &[]) else { return };
    let mut owner = d.register("owner");
    let room = owner.client.create_room("crashy").expect("create").room;
    let mut posters: Vec<_> = (0..THREADS).map(|i| d.register(&format!("c{i}x"))).collect();
    for p in &mut posters {
        p.client.join_room(room).expect("join");
    }
    let home = tempfile::tempdir().expect("tempdir");
    let mut tail = Tail::follow_room(&d, home.path(), room);

    let acked: Mutex<HashMap<u64, String>> = Mutex::new(HashMap::new());
    let acked_count = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs(90);
    let daemon = Mutex::new(&mut d);
    std::thread::scope(|s| {
        for (i, p) in posters.into_iter().enumerate() {
            let (acked, acked_count, daemon) = (&acked, &acked_count, &daemon);
            s.spawn(move || {
                let mut client = p.client;
                for n in 0..EACH {
                    let key = chime_client::new_idempotency_key();
                    let text = format!("t{i} n{n}");
                    loop {
                        match client.post(room, &key, &text) {
                            Ok(posted) => {
                                let prev = acked.lock().expect("lock").insert(posted.seq.get(), text.clone());
                                assert!(prev.is_none(), "seq {} acknowledged twice", posted.seq);
                                acked_count.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            Err(e) if e.is_retryable() => {
                                // The daemon is gone or restarting: same key on a new connection.
                                std::thread::sleep(Duration::from_millis(20));
                                let d = daemon.lock().expect("lock");
                                client = reconnect(&d, &p.token, deadline);
                            }
                            Err(ClientError::Server(e)) => panic!("post refused: {e}"),
                            Err(e) => panic!("post failed: {e:?}"),
                        }
                        assert!(Instant::now() < deadline, "posting did not finish in time");
                    }
                }
            });
        }
        // Kill once the burst is well under way. Holding the lock keeps posters from reconnecting
        // to a half-started daemon.
        while acked_count.load(Ordering::SeqCst) < 100 {
            assert!(Instant::now() < deadline, "burst never got going");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut d = daemon.lock().expect("lock");
        d.kill9();
        std::thread::sleep(Duration::from_millis(300));
        d.restart();
    });
    let acked = acked.into_inner().expect("lock");
    assert_eq!(acked.len(), THREADS * EACH);

    let mut reader = d.resume(&owner.token);
    let history = history_all(&mut reader, room);
    let by_seq: HashMap<u64, &str> = history.iter().map(|d| (d.seq.get(), d.text())).collect();
    for (seq, text) in &acked {
        assert_eq!(by_seq.get(seq).copied(), Some(text.as_str()), "acknowledged seq {seq} lost or changed");
    }
    let mut texts: HashMap<&str, usize> = HashMap::new();
    for d in &history {
        *texts.entry(d.text()).or_default() += 1;
    }
    let doubled: Vec<_> = texts.iter().filter(|(t, n)| **n > 1 && t.starts_with('t')).collect();
    assert!(doubled.is_empty(), "retries double-posted: {doubled:?}");
    let head = history.last().map(|d| d.seq.get()).unwrap_or(0);
    let seqs: Vec<u64> = history.iter().map(|d| d.seq.get()).collect();
    assert_contiguous("history after the crash", &seqs, 1, head);

    let lines = tail.until_seq(room, head, Duration::from_secs(30));
    let seqs: Vec<u64> = lines.iter().map(|v| json_u64(v, "seq")).collect();
    assert_contiguous("chime tail across the restart", &seqs, 1, head);
    drop(owner);
}
