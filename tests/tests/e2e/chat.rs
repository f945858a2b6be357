//! (a) Two users chat live, over the protocol and through the real `chime` CLI.

use crate::util::*;
use chime_tests::daemon::{Backend, Daemon};
use std::time::Duration;

on_both_stores!(two_users_chat_live, cli_chat_session);

fn two_users_chat_live(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "chat_live", &[]) else { return };
    let mut alice = d.register("alice");
    let mut bob = d.register("bob");
    let room = alice.client.create_room("lounge").expect("create room").room;
    bob.client.join_room(room).expect("join");
    let key = chime_client::new_idempotency_key();
    let posted = alice.client.post(room, &key, "hello bob").expect("post");
    // Bob's own JOIN comes first; the message is the last push he gets.
    let got = pushes_until(&mut bob.client, room, posted.seq, Duration::from_secs(5));
    let got = got.last().expect("a push");
    assert_eq!((got.seq, got.text(), got.author.as_str()), (posted.seq, "hello bob", alice.name.as_str()));
    // The poster's own connection gets the push too.
    let mine = pushes_until(&mut alice.client, room, posted.seq, Duration::from_secs(5));
    assert_eq!(mine.last().map(|d| d.text()), Some("hello bob"));
    let reply = bob.client.post(room, &chime_client::new_idempotency_key(), "hi alice").expect("post");
    assert_eq!(reply.seq, posted.seq.next());
    let got = next_delta(&mut alice.client, room, Duration::from_secs(5));
    assert_eq!((got.seq, got.text(), got.author.as_str()), (reply.seq, "hi alice", bob.name.as_str()));
}

fn cli_chat_session(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "cli_chat", &[]) else { return };
    let homes = tempfile::tempdir().expect("tempdir");
    let (home_a, home_b) = (homes.path().join("a"), homes.path().join("b"));
    let (alice, bob) = (unique("alice"), unique("bob"));

    let mut cmd = d.cli(&home_a);
    cmd.args(["register", &alice]);
    let out = cli_ok(cmd);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(json_str(&out[0], "user"), alice);
    json_u64(&out[0], "user_id");

    let mut cmd = d.cli(&home_b);
    cmd.args(["register", &bob]);
    let bob_id = json_u64(&cli_ok(cmd)[0], "user_id");
    assert!(bob_id > 0);

    let mut cmd = d.cli(&home_a);
    cmd.args(["room", "create", "general"]);
    let out = cli_ok(cmd);
    assert_eq!(out.len(), 1, "{out:?}");
    let room = json_u64(&out[0], "room");
    assert_eq!(json_str(&out[0], "name"), "general");
    let room_arg = room.to_string();

    let mut cmd = d.cli(&home_b);
    cmd.args(["room", "join", &room_arg]);
    let out = cli_ok(cmd);
    assert_eq!(json_u64(&out[0], "room"), room);

    let mut cmd = d.cli(&home_b);
    cmd.args(["tail", &room_arg, "--after", "0"]);
    let mut tail = Tail::spawn(cmd);
    // Seq 1 is the room's creation, seq 2 bob's join.
    let caught_up = tail.until_seq(room, 2, Duration::from_secs(10));
    assert_eq!(json_str(&caught_up[0], "kind"), "create");

    let mut cmd = d.cli(&home_a);
    cmd.args(["send", &room_arg, "hello", "bob"]);
    let out = cli_ok(cmd);
    assert_eq!(json_u64(&out[0], "room"), room);
    let seq = json_u64(&out[0], "seq");
    assert_eq!(seq, 3);

    let live = tail.until_seq(room, seq, Duration::from_secs(10));
    let last = live.last().expect("a line");
    assert_eq!(json_str(last, "text"), "hello bob");
    assert_eq!(json_str(last, "author"), alice);
    assert_eq!(json_str(last, "kind"), "message");

    let mut cmd = d.cli(&home_b);
    cmd.args(["send", &room_arg, "hi alice"]);
    assert_eq!(json_u64(&cli_ok(cmd)[0], "seq"), 4);
    let live = tail.until_seq(room, 4, Duration::from_secs(10));
    assert_eq!(json_str(live.last().expect("a line"), "author"), bob);
    tail.kill();

    let mut cmd = d.cli(&home_a);
    cmd.args(["history", &room_arg]);
    let lines = cli_ok(cmd);
    let seqs: Vec<u64> = lines.iter().map(|v| assert_delta_shape(v, room)).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let kinds: Vec<&str> = lines.iter().map(|v| json_str(v, "kind")).collect();
    assert_eq!(kinds, ["create", "join", "message", "message"]);
    assert_eq!(json_str(&lines[2], "text"), "hello bob");
    assert_eq!(json_str(&lines[3], "text"), "hi alice");

    let mut cmd = d.cli(&home_a);
    cmd.args(["history", &room_arg, "--after", "2", "--limit", "1"]);
    let lines = cli_ok(cmd);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(json_u64(&lines[0], "seq"), 3);
}
