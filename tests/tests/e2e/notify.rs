//! The push-notification path through the real daemon: with `[notify] spool` set, a mention of an
//! offline member (and any message in a direct dialog) becomes one JSON line in the spool after
//! `delay_ms`; a read of the message before the delay cancels it; a room at notification level
//! `none` notifies nothing.

use crate::util::*;
use chime_tests::daemon::{Backend, Daemon};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

on_both_stores!(mentions_reach_the_spool_after_the_delay_unless_read);

fn spool_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Waits until the spool has a line for (room, seq), up to `timeout`.
fn wait_for(path: &Path, room: u64, seq: u64, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) =
            spool_lines(path).into_iter().find(|l| json_u64(l, "room") == room && json_u64(l, "seq") == seq)
        {
            return Some(line);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mentions_reach_the_spool_after_the_delay_unless_read(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let spool = dir.path().join("push.jsonl");
    let config = dir.path().join("chimed.toml");
    std::fs::write(&config, format!("[notify]\ndelay_ms = 300\nspool = {:?}\n", spool.display().to_string()))
        .expect("config");
    let Some(d) = Daemon::start_backend(backend, "notify", &["--config", &config.display().to_string()]) else {
        return;
    };
    let mut ann = d.register(&unique("ann"));
    let bob = d.register(&unique("bob"));
    let room = ann.client.create_room("lobby").expect("create").room;
    let mut bob_client = bob.client;
    bob_client.join_room(room).expect("join");
    drop(bob_client);

    // Offline and mentioned: one line, after the delay, not before.
    let posted = Instant::now();
    let seq = ann.client.post(room, "m1", &format!("@{} lunch?", bob.name)).expect("post").seq;
    ann.client.post(room, "m0", "no mention here").expect("post");
    let line = wait_for(&spool, room.get(), seq.get(), Duration::from_secs(10)).expect("a spool line");
    assert!(posted.elapsed() >= Duration::from_millis(300), "delivered before the delay");
    assert_eq!((json_str(&line, "user"), json_str(&line, "author")), (bob.name.as_str(), ann.name.as_str()));
    assert_eq!((json_u64(&line, "user_id"), json_str(&line, "reason")), (bob.user_id, "mention"));
    assert!(line.get("text").is_none(), "no message text in the spool: {line}");

    // Mentioned, then read (on a device of bob's) before the delay: nothing.
    let mut phone = d.resume(&bob.token);
    let read = ann.client.post(room, "m2", &format!("@{} read me", bob.name)).expect("post").seq;
    phone.receipt(room, read, read).expect("read");
    // Level none for the room: nothing either.
    let home = tempfile::tempdir().expect("home");
    let mut login = d.cli(home.path());
    login.args(["login", &bob.name]);
    cli_ok(login);
    let mut level = d.cli(home.path());
    level.args(["settings", &format!("notify.{}", room.get()), "none"]);
    cli_ok(level);
    drop(phone);
    let silent = ann.client.post(room, "m3", &format!("@{} hush", bob.name)).expect("post").seq;

    // A direct dialog notifies without a mention.
    let dm = ann.client.open_direct(&bob.name).expect("dm").room;
    let direct = ann.client.post(dm, "d1", "psst").expect("post").seq;
    let line = wait_for(&spool, dm.get(), direct.get(), Duration::from_secs(10)).expect("a direct line");
    assert_eq!(json_str(&line, "reason"), "direct");

    // By now (well past 300 ms for each) the read and the silenced mention would have arrived.
    std::thread::sleep(Duration::from_millis(600));
    let lines = spool_lines(&spool);
    let seqs: Vec<(u64, u64)> = lines.iter().map(|l| (json_u64(l, "room"), json_u64(l, "seq"))).collect();
    assert!(!seqs.contains(&(room.get(), read.get())), "a read cancels: {seqs:?}");
    assert!(!seqs.contains(&(room.get(), silent.get())), "level none: {seqs:?}");
    assert_eq!(seqs, [(room.get(), seq.get()), (dm.get(), direct.get())], "exactly these");
}
