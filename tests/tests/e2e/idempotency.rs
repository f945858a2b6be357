//! (e) A retried POST with the same idempotency key gets the same seq, flagged duplicate, and the
//! room holds the message once.

use crate::util::*;
use chime_tests::daemon::{Backend, Daemon};

on_both_stores!(same_key_posts_once);

fn same_key_posts_once(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "idempotency", &[]) else { return };
    let mut alice = d.register("alice");
    let room = alice.client.create_room("once").expect("create").room;
    let key = chime_client::new_idempotency_key();
    let first = alice.client.post(room, &key, "only once").expect("post");
    assert!(!first.duplicate);
    let again = alice.client.post(room, &key, "only once").expect("retry");
    assert_eq!(again.seq, first.seq);
    assert!(again.duplicate, "a retry must be flagged duplicate");
    // The same key from another connection of the same user is still the same post.
    let mut other = d.resume(&alice.token);
    let third = other.post(room, &key, "only once").expect("retry elsewhere");
    assert_eq!((third.seq, third.duplicate), (first.seq, true));
    let other_key = chime_client::new_idempotency_key();
    let next = alice.client.post(room, &other_key, "only once").expect("new key");
    assert_eq!(next.seq, first.seq.next(), "a new key is a new post");
    let history = history_all(&mut alice.client, room);
    assert_eq!(history.iter().filter(|d| d.seq == first.seq).count(), 1);
    assert_eq!(history.iter().filter(|d| d.text() == "only once").count(), 2);
    assert_eq!(history.last().map(|d| d.seq.get()), Some(next.seq.get()));
}
