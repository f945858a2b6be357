//! (b) 1,000 posts from 10 concurrent clients reach a protocol tail and a `chime tail` in seq
//! order, with no gap and no duplicate.

use crate::util::*;
use chime_tests::daemon::{Backend, Daemon};
use std::time::Duration;

on_both_stores!(thousand_posts_arrive_in_order);

fn thousand_posts_arrive_in_order(backend: Backend) {
    const POSTERS: usize = 10;
    const EACH: usize = 100;
    let Some(d) = Daemon::start_backend(backend, "ordering", &[]) else { return };
    let mut owner = d.register("owner");
    let room = owner.client.create_room("busy").expect("create").room;
    let mut watcher = d.register("watcher");
    watcher.client.join_room(room).expect("join");

    let home = tempfile::tempdir().expect("tempdir");
    let mut tail = Tail::follow_room(&d, home.path(), room);

    let mut posters: Vec<_> = (0..POSTERS).map(|i| d.register(&format!("p{i}x"))).collect();
    for p in &mut posters {
        p.client.join_room(room).expect("join");
    }
    let start = head_seq(&mut owner.client, room);
    std::thread::scope(|s| {
        for (i, p) in posters.iter_mut().enumerate() {
            s.spawn(move || {
                for n in 0..EACH {
                    let key = chime_client::new_idempotency_key();
                    p.client.post(room, &key, &format!("p{i} n{n}")).unwrap_or_else(|e| panic!("post: {e:?}"));
                }
            });
        }
    });
    let end = start + (POSTERS * EACH) as u64;
    assert_eq!(head_seq(&mut owner.client, room), end);

    // The watcher joined before the posters: it gets every delta after its own join.
    let pushed = pushes_until(&mut watcher.client, room, end, Duration::from_secs(30));
    let first = pushed.first().map(|d| d.seq.get()).unwrap_or(0);
    assert!(first <= start + 1, "watcher's first push is seq {first}, posting started after {start}");
    let seqs: Vec<u64> = pushed.iter().map(|d| d.seq.get()).collect();
    assert_contiguous("protocol tail", &seqs, first, end);

    let lines = tail.until_seq(room, end, Duration::from_secs(30));
    let seqs: Vec<u64> = lines.iter().map(|v| json_u64(v, "seq")).collect();
    assert_contiguous("chime tail", &seqs, 1, end);
    // Each poster's messages keep their order.
    let history = history_all(&mut owner.client, room);
    for i in 0..POSTERS {
        let mine: Vec<&str> =
            history.iter().filter(|d| d.text().starts_with(&format!("p{i} "))).map(|d| d.text()).collect();
        let want: Vec<String> = (0..EACH).map(|n| format!("p{i} n{n}")).collect();
        assert_eq!(mine, want.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
