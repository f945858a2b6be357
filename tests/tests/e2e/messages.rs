//! Acting on messages through the real daemon and the real `chime`: edits, deletes, reactions,
//! replies and pins are new deltas that every member receives as pushes and that SYNC carries;
//! `view` shows the messages in their current state in the JSON shape of interface.md; the role
//! decides who may delete or pin another's message.

use crate::util::*;
use chime_protocol::{DeltaBody, DeltaKind, ErrorCode, RoomId, Seq};
use chime_tests::daemon::{Backend, Daemon};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

on_both_stores!(
    actions_are_deltas_and_view_shows_the_state,
    members_cannot_moderate_others_messages,
    calls_are_signalled_in_the_log
);

fn cli(d: &Daemon, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = d.cli(home);
    cmd.args(args);
    cli_ok(cmd)
}

fn actions_are_deltas_and_view_shows_the_state(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "message_actions", &[]) else { return };
    let ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);
    let room = json_u64(&cli(&d, home.path(), &["room", "create", "lobby"])[0], "room");
    bob.client.join_room(RoomId(room)).expect("join");
    let r = room.to_string();

    // seq 3: ann's message; 4: bob's.
    let sent = cli(&d, home.path(), &["send", &r, "hello"]);
    assert_eq!(json_u64(&sent[0], "seq"), 3);
    bob.client.post(RoomId(room), "b1", "hi ann").expect("post");
    let got = pushes_until(&mut bob.client, room, 4, Duration::from_secs(5));
    assert_eq!(got.last().map(|d| d.seq.get()), Some(4));

    let steps: [(&[&str], u64, DeltaKind); 6] = [
        (&["edit", &r, "3", "hello", "everyone"], 5, DeltaKind::EDIT),
        (&["react", &r, "4", "\u{1f44d}"], 6, DeltaKind::REACT),
        (&["reply", &r, "4", "hi", "bob"], 7, DeltaKind::REPLY),
        (&["pin", &r, "4"], 8, DeltaKind::PIN),
        (&["delete", &r, "3"], 9, DeltaKind::DELETE),
        (&["react", &r, "7", "\u{1f389}"], 10, DeltaKind::REACT),
    ];
    for (args, seq, kind) in steps {
        let out = cli(&d, home.path(), args);
        assert_eq!(out.len(), 1, "{args:?}: {out:?}");
        assert_eq!((json_u64(&out[0], "room"), json_u64(&out[0], "seq")), (room, seq), "{args:?}");
        // Every member gets the action as a push, in order.
        let pushed = next_delta(&mut bob.client, room, Duration::from_secs(5));
        assert_eq!((pushed.seq.get(), pushed.kind()), (seq, kind), "{args:?}");
    }
    // Repeats change nothing and say so with the first seq.
    let again = cli(&d, home.path(), &["delete", &r, "3"]);
    assert_eq!(json_u64(&again[0], "seq"), 9);
    let again = cli(&d, home.path(), &["react", &r, "4", "\u{1f44d}"]);
    assert_eq!(json_u64(&again[0], "seq"), 6);
    bob.client.react(RoomId(room), Seq(4), "\u{1f44d}", false).expect("bob reacts too");

    // The pushes' bodies say what they act on.
    let log = history_all(&mut bob.client, room);
    let bodies: Vec<&DeltaBody> = log.iter().map(|d| &d.body).collect();
    assert!(matches!(bodies[4], DeltaBody::Edit(e) if e.target == 3 && e.text == "hello everyone"), "{bodies:?}");
    assert!(matches!(bodies[6], DeltaBody::Reply(rp) if rp.reply_to == 4 && rp.text == "hi bob"), "{bodies:?}");
    assert!(matches!(bodies[8], DeltaBody::Delete(t) if t.target == 3), "{bodies:?}");
    assert_eq!(log[2].text(), "hello", "the original stays in the log");

    // `view`: the current state, oldest first, in the shape interface.md fixes.
    let view = cli(&d, home.path(), &["view", &r]);
    let seqs: Vec<u64> = view.iter().map(|m| json_u64(m, "seq")).collect();
    assert_eq!(seqs, [3, 4, 7]);
    for m in &view {
        for key in ["room", "seq", "author", "ts", "text", "edited", "deleted", "reactions", "reply_to", "pinned"] {
            assert!(m.get(key).is_some(), "{m}: no {key}");
        }
        assert!(is_rfc3339(json_str(m, "ts")), "{m}");
    }
    let (a, b, c) = (&view[0], &view[1], &view[2]);
    assert_eq!(
        (a["text"].clone(), a["deleted"].clone(), a["edited"].clone()),
        (Value::Null, Value::Bool(true), Value::Bool(true))
    );
    assert_eq!(
        (json_str(b, "text"), b["pinned"].as_bool(), b["reactions"]["\u{1f44d}"].as_u64()),
        ("hi ann", Some(true), Some(2))
    );
    assert_eq!(
        (json_str(c, "text"), c["reply_to"].as_u64(), c["reactions"]["\u{1f389}"].as_u64()),
        ("hi bob", Some(4), Some(1))
    );
    assert_eq!(b["reply_to"], Value::Null);
    let limited = cli(&d, home.path(), &["view", &r, "--limit", "2"]);
    assert_eq!(limited.iter().map(|m| json_u64(m, "seq")).collect::<Vec<_>>(), [4, 7], "the newest two");

    // Deleted messages take no more actions; a reaction taken back is gone.
    assert_eq!(
        server_code("react to a deleted message", bob.client.react(RoomId(room), Seq(3), "x", false)),
        ErrorCode::NOT_FOUND
    );
    bob.client.react(RoomId(room), Seq(4), "\u{1f44d}", true).expect("take back");
    let page = bob.client.view(RoomId(room), Seq::ZERO, 10).expect("view");
    let four = page.messages.iter().find(|m| m.seq == 4).expect("message 4");
    assert_eq!((four.reactions[0].count, four.reactions[0].mine), (1, false));
}

fn members_cannot_moderate_others_messages(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "message_roles", &[]) else { return };
    let mut ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let mut eve = d.register(&unique("eve"));
    let room = ann.client.create_room("lobby").expect("create").room;
    bob.client.join_room(room).expect("join");
    let ann_msg = ann.client.post(room, "a1", "owner's").expect("post").seq;
    let bob_msg = bob.client.post(room, "b1", "bob's").expect("post").seq;
    assert_eq!(server_code("edit another's", bob.client.edit(room, ann_msg, "e1", "x")), ErrorCode::FORBIDDEN);
    assert_eq!(server_code("delete another's", bob.client.delete(room, ann_msg)), ErrorCode::FORBIDDEN);
    assert_eq!(server_code("pin as member", bob.client.pin(room, bob_msg, false)), ErrorCode::FORBIDDEN);
    assert_eq!(server_code("a stranger reacts", eve.client.react(room, bob_msg, "x", false)), ErrorCode::NOT_MEMBER);
    assert_eq!(server_code("seq 0", bob.client.delete(room, 0)), ErrorCode::INVALID_ARGUMENT);
    assert_eq!(
        server_code("a long reaction", bob.client.react(room, bob_msg, &"x".repeat(33), false)),
        ErrorCode::INVALID_ARGUMENT
    );
    // The owner moderates.
    ann.client.delete(room, bob_msg).expect("the owner deletes any message");
    ann.client.pin(room, ann_msg, false).expect("the owner pins");
    // Nothing refused reached the log.
    let kinds: Vec<DeltaKind> = history_all(&mut ann.client, room).iter().map(|d| d.kind()).collect();
    assert_eq!(
        kinds,
        [DeltaKind::CREATE, DeltaKind::JOIN, DeltaKind::MESSAGE, DeltaKind::MESSAGE, DeltaKind::DELETE, DeltaKind::PIN]
    );
}

/// Call signalling through `chime call`: invite, accept, end are deltas every member receives.
fn calls_are_signalled_in_the_log(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "calls", &[]) else { return };
    let ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);
    let room = json_u64(&cli(&d, home.path(), &["room", "create", "voice"])[0], "room");
    bob.client.join_room(RoomId(room)).expect("join");
    let r = room.to_string();
    let invite = json_u64(&cli(&d, home.path(), &["call", &r, "invite", "--data", "offer"])[0], "seq");
    let got = pushes_until(&mut bob.client, room, invite, Duration::from_secs(5));
    let last = got.last().expect("the invite");
    assert!(matches!(&last.body, DeltaBody::CallInvite(c) if c.data == "offer"), "{last:?}");
    let accept =
        bob.client.call(RoomId(room), chime_protocol::CallAction::ACCEPT, invite, "answer").expect("accept").seq;
    let end = cli(&d, home.path(), &["call", &r, "end", "--call", &invite.to_string()]);
    assert_eq!(json_u64(&end[0], "seq"), accept.get() + 1);
    let pushed = next_delta(&mut bob.client, room, Duration::from_secs(5));
    let pushed = if pushed.seq == accept { next_delta(&mut bob.client, room, Duration::from_secs(5)) } else { pushed };
    assert!(matches!(&pushed.body, DeltaBody::CallEnd(c) if c.call == invite), "{pushed:?}");
    let mut bad = d.cli(home.path());
    bad.args(["call", &r, "accept", "--call", "1"]);
    let (code, _, err) = cli_run(&mut bad);
    assert_eq!(code, Some(1), "{err}");
}
