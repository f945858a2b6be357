//! (d) SYNC of a long room while others post: the syncing connection sees every seq once, in
//! order, across the switch from SYNC pages to live pushes.

use crate::util::*;
use chime_protocol::{ClientFrame, RoomCursor, Seq, ServerFrame, Sync};
use chime_tests::daemon::{Backend, Daemon};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

on_both_stores!(sync_while_posting_sees_each_seq_once);

fn sync_while_posting_sees_each_seq_once(backend: Backend) {
    const BACKLOG: usize = 3000;
    const POSTERS: usize = 3;
    const EACH: usize = 150;
    let Some(d) = Daemon::start_backend(backend, "sync_race", &[]) else { return };
    let mut owner = d.register("owner");
    let room = owner.client.create_room("long").expect("create").room;
    let syncer = d.register("syncer");
    let mut syncer_client = syncer.client;
    syncer_client.join_room(room).expect("join");
    let mut posters: Vec<_> = (0..POSTERS).map(|i| d.register(&format!("s{i}x"))).collect();
    for p in &mut posters {
        p.client.join_room(room).expect("join");
    }
    let backlog: Vec<String> = (0..BACKLOG).map(|n| format!("backlog {n}")).collect();
    post_pipelined(&mut owner.client, room, &backlog);

    let mut conn = d.resume(&syncer.token);
    let go = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        for (i, p) in posters.iter_mut().enumerate() {
            let go = &go;
            s.spawn(move || {
                while !go.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                for n in 0..EACH {
                    let key = chime_client::new_idempotency_key();
                    p.client.post(room, &key, &format!("live s{i} n{n}")).unwrap_or_else(|e| panic!("post: {e:?}"));
                }
            });
        }
        go.store(true, Ordering::SeqCst);
        let sync = ClientFrame::Sync(Sync { rooms: vec![RoomCursor { room, seq: Seq(0) }], page_size: 50 });
        let sync_id = conn.send(&sync).expect("send SYNC");
        let final_head = (BACKLOG + POSTERS * EACH) as u64 + 2 + POSTERS as u64;
        let deadline = Instant::now() + Duration::from_secs(90);
        // Pushes that arrive before the sync's first reply were sent before the server took the
        // SYNC: they are not part of the stream under test.
        let mut started = false;
        let mut done = false;
        let mut seen: Vec<u64> = Vec::new();
        while !(done && seen.last().is_some_and(|&s| s >= final_head)) {
            assert!(Instant::now() < deadline, "sync + pushes stopped at {:?} (done: {done})", seen.last());
            match conn.recv(Some(Duration::from_secs(1))) {
                Ok(Some((id, ServerFrame::DeltaPage(page)))) if id == sync_id => {
                    started = true;
                    assert!(!done, "a page after SYNC_DONE");
                    seen.extend(page.deltas.iter().map(|d| d.seq.get()));
                }
                Ok(Some((id, ServerFrame::SyncDone(_)))) if id == sync_id => {
                    started = true;
                    done = true;
                }
                Ok(Some((0, ServerFrame::Delta(d)))) if d.room == room => {
                    if started {
                        seen.push(d.seq.get());
                    }
                }
                Ok(Some((id, ServerFrame::Error(e)))) if id == sync_id => panic!("SYNC failed: {e}"),
                Ok(_) => {}
                Err(e) => panic!("syncing: {e:?}"),
            }
        }
        seen
    });
    let head = head_seq(&mut owner.client, room);
    assert_contiguous("sync then pushes", &seen, 1, head);
    let history: Vec<u64> = history_all(&mut owner.client, room).iter().map(|d| d.seq.get()).collect();
    assert_eq!(history, seen);
}
