//! Receipts, unread counts and mentions through the real daemon and `chime read|unread|
//! notifications`: the server counts what is unread per room; a read on one device clears the
//! count on the user's other devices at once; a member mentioned while offline finds it at the
//! next login.

use crate::util::*;
use chime_protocol::{ReadState, RoomId, ServerFrame};
use chime_tests::daemon::{Backend, Daemon};
use std::time::{Duration, Instant};

on_both_stores!(reads_clear_every_device_and_mentions_wait_for_the_next_login);
on_both_stores!(unread_counts_arrive_with_the_login);

fn next_read_state(client: &mut chime_client::blocking::Client, timeout: Duration) -> ReadState {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no READ_STATE_CHANGED within {timeout:?}");
        match client.recv(Some(left)) {
            Ok(Some((0, ServerFrame::ReadStateChanged(s)))) => return s,
            Ok(Some(_)) | Ok(None) => {}
            Err(e) => panic!("waiting for READ_STATE_CHANGED: {e:?}"),
        }
    }
}

fn reads_clear_every_device_and_mentions_wait_for_the_next_login(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "receipts", &[]) else { return };
    let mut ann = d.register(&unique("ann"));
    let bob = d.register(&unique("bob"));
    let room = ann.client.create_room("lobby").expect("create").room;
    let mut phone = bob.client;
    phone.join_room(room).expect("join");
    let laptop = d.resume(&bob.token);
    // bob goes offline on both devices; ann writes, mentioning him once.
    drop(phone);
    drop(laptop);
    for i in 0..4 {
        ann.client.post(room, &format!("k{i}"), &format!("news {i}")).expect("post");
    }
    let mention = ann.client.post(room, "m", &format!("@{} are you there?", bob.name)).expect("post").seq;

    // Next login: the CLI shows the counts and the mention.
    let home = tempfile::tempdir().expect("home");
    let mut resume = d.cli(home.path());
    resume.args(["login", &bob.name]);
    cli_ok(resume);
    let mut unread = d.cli(home.path());
    unread.arg("unread");
    let rows = cli_ok(unread);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (json_u64(&rows[0], "room"), json_u64(&rows[0], "unread"), json_u64(&rows[0], "mentions")),
        (room.get(), 5, 1)
    );
    let mut notes = d.cli(home.path());
    notes.arg("notifications");
    let notes = cli_ok(notes);
    assert_eq!((json_u64(&notes[0], "seq"), json_str(&notes[0], "author")), (mention.get(), ann.name.as_str()));
    assert_eq!(notes[0]["read"], false);
    assert!(is_rfc3339(json_str(&notes[0], "ts")));

    // Two devices online; reading on one clears the other.
    let mut phone = d.resume(&bob.token);
    let mut laptop = d.resume(&bob.token);
    let state = phone.receipt(room, mention, mention).expect("read on the phone");
    assert_eq!((state.unread, state.mentions, state.read), (0, 0, mention));
    let pushed = next_read_state(&mut laptop, Duration::from_secs(5));
    assert_eq!((pushed.room, pushed.read, pushed.unread), (RoomId(room.get()), mention, 0));
    let mut read = d.cli(home.path());
    read.args(["read", &room.to_string(), "2"]);
    let out = cli_ok(read);
    assert_eq!(
        (json_u64(&out[0], "unread"), json_u64(&out[0], "read")),
        (0, mention.get()),
        "reading never moves back"
    );
    let mut unread = d.cli(home.path());
    unread.arg("unread");
    assert!(cli_ok(unread).is_empty());
    // A new message counts again, on both devices' next question.
    ann.client.post(room, "k9", "one more").expect("post");
    let list = laptop.unread(RoomId(0), 0).expect("unread");
    assert_eq!(list.rooms.iter().map(|r| (r.room, r.unread)).collect::<Vec<_>>(), [(room, 1)]);
}

/// A login with something unread is followed at once by UNREAD_AT_LOGIN: the counts without asking.
fn unread_counts_arrive_with_the_login(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "unread_login", &[]) else { return };
    let mut ann = d.register(&unique("ann"));
    let bob = d.register(&unique("bob"));
    let room = ann.client.create_room("lobby").expect("create").room;
    let mut phone = bob.client;
    phone.join_room(room).expect("join");
    drop(phone);
    ann.client.post(room, "k1", "one").expect("post");
    ann.client.post(room, "k2", &format!("two, @{}", bob.name)).expect("post");
    let mut laptop = d.resume(&bob.token);
    let deadline = Instant::now() + Duration::from_secs(5);
    let list = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no UNREAD_AT_LOGIN");
        match laptop.recv(Some(left)) {
            Ok(Some((0, ServerFrame::UnreadAtLogin(l)))) => break l,
            Ok(_) => {}
            Err(e) => panic!("waiting for UNREAD_AT_LOGIN: {e:?}"),
        }
    };
    assert_eq!(list.rooms.iter().map(|r| (r.room, r.unread, r.mentions)).collect::<Vec<_>>(), [(room, 2, 1)]);
    // Nothing unread: no push (ann's own messages do not count for her).
    let mut again = d.resume(&ann.token);
    let quiet = again.recv(Some(Duration::from_millis(500)));
    assert!(!matches!(quiet, Ok(Some((0, ServerFrame::UnreadAtLogin(_))))), "{quiet:?}");
}
