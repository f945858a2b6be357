//! SEARCH through the real daemon and the real `chime search`: messages found by all their
//! words, printed in exactly the shape `chime view` prints; deleted messages never found, edited
//! ones by their new text only; members only; a query without words refused.

use crate::util::*;
use chime_protocol::{ErrorCode, RoomId, Seq};
use chime_tests::daemon::{Backend, Daemon};
use serde_json::Value;
use std::path::Path;

on_both_stores!(search_prints_messages_as_view_does);

fn cli(d: &Daemon, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = d.cli(home);
    cmd.args(args);
    cli_ok(cmd)
}

fn seqs_of(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|v| json_u64(v, "seq")).collect()
}

fn search_prints_messages_as_view_does(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "search_cli", &[]) else { return };
    let ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let mut eve = d.register(&unique("eve"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);
    let room = json_u64(&cli(&d, home.path(), &["room", "create", "findings"])[0], "room");
    let r = room.to_string();
    bob.client.join_room(RoomId(room)).expect("join");

    // seq 2: bob's JOIN; 3..=6 the messages; 7 a reply.
    cli(&d, home.path(), &["send", &r, "Hello brave new world"]);
    bob.client.post(RoomId(room), "b1", "goodbye, cruel world").expect("post");
    cli(&d, home.path(), &["send", &r, "hello again"]);
    cli(&d, home.path(), &["send", &r, "the old wording"]);
    cli(&d, home.path(), &["reply", &r, "4", "world", "peace"]);
    cli(&d, home.path(), &["react", &r, "3", "\u{1f44d}"]);

    let hits = cli(&d, home.path(), &["search", &r, "WORLD"]);
    assert_eq!(seqs_of(&hits), [7, 4, 3], "newest first, replies too, any case");
    // Each hit is the very object `view` prints for that message.
    let view = cli(&d, home.path(), &["view", &r]);
    for hit in &hits {
        let seq = json_u64(hit, "seq");
        let same = view.iter().find(|m| json_u64(m, "seq") == seq).expect("in view");
        assert_eq!(hit, same);
        for key in ["room", "seq", "author", "ts", "text", "edited", "deleted", "reactions", "reply_to", "pinned"] {
            assert!(hit.get(key).is_some(), "{hit}: no {key}");
        }
    }
    assert_eq!(hits[0]["reply_to"], 4);
    assert_eq!(hits[2]["reactions"]["\u{1f44d}"], 1);
    assert_eq!(seqs_of(&cli(&d, home.path(), &["search", &r, "hello", "world"])), [3]);
    assert_eq!(seqs_of(&cli(&d, home.path(), &["search", &r, "world", "--limit", "2"])), [7, 4]);

    // Edited: found by the new text, not the old. Deleted: never.
    cli(&d, home.path(), &["edit", &r, "6", "the new phrasing"]);
    assert!(cli(&d, home.path(), &["search", &r, "wording"]).is_empty());
    let edited = cli(&d, home.path(), &["search", &r, "phrasing"]);
    assert_eq!(seqs_of(&edited), [6]);
    assert_eq!((json_str(&edited[0], "text"), edited[0]["edited"].as_bool()), ("the new phrasing", Some(true)));
    cli(&d, home.path(), &["delete", &r, "3"]);
    assert_eq!(seqs_of(&cli(&d, home.path(), &["search", &r, "world"])), [7, 4]);
    assert!(cli(&d, home.path(), &["search", &r, "brave"]).is_empty());

    // Pages through the client library: `before` goes back from the last seq of a page.
    let page = bob.client.search(RoomId(room), "world", Seq::ZERO, 1).expect("search");
    assert_eq!((page.messages[0].seq, page.next_before), (Seq(7), Some(Seq(7))));
    let page = bob.client.search(RoomId(room), "world", Seq(7), 1).expect("search");
    assert_eq!(page.messages[0].seq, Seq(4));

    // Members only; a query must have a word.
    let code = server_code("non-member", eve.client.search(RoomId(room), "world", Seq::ZERO, 10));
    assert_eq!(code, ErrorCode::NOT_MEMBER);
    let code = server_code("no words", bob.client.search(RoomId(room), " ?! \u{1f44d} ", Seq::ZERO, 10));
    assert_eq!(code, ErrorCode::INVALID_ARGUMENT);
    let mut cmd = d.cli(home.path());
    cmd.args(["search", &r, "--", "--"]);
    let (code, stdout, stderr) = cli_run(&mut cmd);
    assert_eq!(code, Some(1), "stdout: {stdout}");
    assert!(stderr.contains("at least one word"), "{stderr}");
}
