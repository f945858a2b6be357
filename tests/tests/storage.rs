//! One conformance suite for `chime-storage`: every check is written once and runs unchanged
//! against the embedded SQLite store and a real throwaway PostgreSQL, so the two cannot drift.
//!
//! Checks taking `&mut dyn Store` get a store on a fresh database; checks taking `&Db` open as
//! many connections to a fresh database as they need (concurrency, reopening).

use std::collections::BTreeMap;
use std::thread;

use chime_storage::{
    Delta, DeltaKind, MemberRecord, NewPost, NewSession, PostOutcome, RoomId, RoomKind, RoomRecord, Store, StoreError,
    UserRecord,
};
use chime_tests::postgres;

/// A fresh database for one test.
struct Db {
    /// What `chime_storage::open` takes.
    url: String,
    /// Keeps a SQLite database's directory alive for the test.
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    fn sqlite() -> Db {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite:{}", dir.path().join("data/chime.db").display());
        Db { url, _dir: Some(dir) }
    }

    /// `None` only when `CHIME_SKIP_PG=1`.
    fn postgres(test: &str) -> Option<Db> {
        let server = postgres::shared()?;
        Some(Db { url: server.create_database(test), _dir: None })
    }

    fn open(&self) -> Box<dyn Store> {
        match chime_storage::open(&self.url) {
            Ok(store) => store,
            Err(e) => panic!("opening {}: {e:?}", self.url),
        }
    }
}

/// Instantiates every check once per store.
macro_rules! conformance {
    (store: [$($check:ident),* $(,)?], db: [$($db_check:ident),* $(,)?] $(,)?) => {
        mod on_sqlite {
            $(#[test] fn $check() { super::$check(&mut *super::Db::sqlite().open()); })*
            $(#[test] fn $db_check() { super::$db_check(&super::Db::sqlite()); })*
        }
        mod on_postgres {
            $(#[test] fn $check() {
                if let Some(db) = super::Db::postgres(stringify!($check)) {
                    super::$check(&mut *db.open());
                }
            })*
            $(#[test] fn $db_check() {
                if let Some(db) = super::Db::postgres(stringify!($db_check)) {
                    super::$db_check(&db);
                }
            })*
        }
    };
}

conformance! {
    store: [
        users,
        sessions,
        create_room_starts_the_log,
        join_and_leave,
        rooms_of_user,
        members_are_paged,
        posts_take_contiguous_seqs_in_input_order,
        duplicate_keys_write_nothing,
        non_members_write_nothing,
        deltas_after_pages,
    ],
    db: [concurrent_writers_leave_no_gaps, concurrent_opens_migrate_once, reopening_keeps_everything],
}

const T0: i64 = 1_700_000_000_000;

fn user(store: &mut dyn Store, name: &str) -> UserRecord {
    store.create_user(name, &format!("$argon2id$hash-of-{name}")).expect("create user")
}

fn room(store: &mut dyn Store, name: &str, owner: &UserRecord) -> RoomRecord {
    store.create_room(name, RoomKind::GROUP, owner.id, &owner.name, T0).expect("create room").0
}

fn post(room: RoomId, author: &UserRecord, key: &str, text: &str) -> NewPost {
    NewPost {
        room,
        author_id: author.id,
        author: author.name.clone(),
        idempotency_key: key.into(),
        text: text.into(),
        now_ms: T0 + 5,
    }
}

fn inserted(outcome: &PostOutcome) -> &Delta {
    match outcome {
        PostOutcome::Inserted(delta) => delta,
        other => panic!("expected an inserted delta, got {other:?}"),
    }
}

fn log(store: &mut dyn Store, room: RoomId) -> Vec<Delta> {
    store.deltas_after(room, 0, 10_000).expect("deltas")
}

fn seqs(deltas: &[Delta]) -> Vec<u64> {
    deltas.iter().map(|d| d.seq).collect()
}

fn users(store: &mut dyn Store) {
    let ada = user(store, "ada");
    assert_eq!(ada.name, "ada");
    assert_eq!(ada.password_hash, "$argon2id$hash-of-ada");
    let bob = user(store, "bob");
    assert_ne!(ada.id, bob.id);
    let err = store.create_user("ada", "other").expect_err("name taken");
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(store.user_by_name("ada").expect("lookup"), Some(ada));
    assert_eq!(store.user_by_name("bob").expect("lookup"), Some(bob));
    assert_eq!(store.user_by_name("nobody").expect("lookup"), None);
}

fn sessions(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let session = |hash: u8| NewSession {
        user_id: ada.id,
        token_hash: [hash; 32],
        ip: "127.0.0.1".into(),
        user_agent: "chime-test/1".into(),
        now_ms: T0,
    };
    store.create_session(&session(1)).expect("session 1");
    store.create_session(&session(2)).expect("session 2");
    assert_eq!(store.session_user(&[1; 32], T0 + 1).expect("lookup"), Some(ada.clone()));
    assert_eq!(store.session_user(&[1; 32], T0 + 2).expect("lookup again"), Some(ada.clone()));
    assert_eq!(store.session_user(&[9; 32], T0).expect("unknown"), None);
    assert!(store.revoke_session(&[1; 32], T0 + 3).expect("revoke"));
    assert!(!store.revoke_session(&[1; 32], T0 + 4).expect("revoke twice"));
    assert!(!store.revoke_session(&[9; 32], T0 + 4).expect("revoke unknown"));
    assert_eq!(store.session_user(&[1; 32], T0 + 5).expect("revoked"), None);
    // Revoking one session leaves the user's others alone.
    assert_eq!(store.session_user(&[2; 32], T0 + 5).expect("other session"), Some(ada));
}

fn create_room_starts_the_log(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let (room, delta) = store.create_room("lobby", RoomKind::GROUP, ada.id, "ada", T0).expect("create");
    assert_eq!((room.name.as_str(), room.kind, room.last_seq), ("lobby", RoomKind::GROUP, 1));
    let expected = Delta {
        room: room.id,
        seq: 1,
        kind: DeltaKind::CREATE,
        author_id: ada.id,
        author: "ada".into(),
        ts_ms: T0,
        text: "lobby".into(),
    };
    assert_eq!(delta, expected);
    assert_eq!(log(store, room.id), [expected]);
    assert_eq!(store.room(room.id).expect("room"), Some(room.clone()));
    assert_eq!(store.room(room.id + 1000).expect("no room"), None);
    assert!(store.is_member(room.id, ada.id).expect("is_member"));
    let owner = MemberRecord { user_id: ada.id, name: "ada".into(), role: "owner".into(), muted: false };
    assert_eq!(store.members(room.id, 0, 10).expect("members"), [owner]);
    let other = store.create_room("lobby", RoomKind::GROUP, ada.id, "ada", T0).expect("same name").0;
    assert_ne!(other.id, room.id, "room names need not be unique");
}

fn join_and_leave(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let lobby = room(store, "lobby", &ada);

    let join = store.join_room(lobby.id, bob.id, "bob", T0 + 1).expect("join").expect("a JOIN delta");
    assert_eq!(
        join,
        Delta {
            room: lobby.id,
            seq: 2,
            kind: DeltaKind::JOIN,
            author_id: bob.id,
            author: "bob".into(),
            ts_ms: T0 + 1,
            text: String::new()
        }
    );
    assert!(store.is_member(lobby.id, bob.id).expect("is_member"));
    assert_eq!(store.join_room(lobby.id, bob.id, "bob", T0 + 2).expect("join twice"), None);
    assert_eq!(store.join_room(lobby.id, ada.id, "ada", T0 + 2).expect("owner joins"), None);
    assert_eq!(store.room(lobby.id).expect("room").expect("exists").last_seq, 2, "no seq for a no-op join");

    let err = store.join_room(lobby.id + 1000, bob.id, "bob", T0).expect_err("no such room");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    let leave = store.leave_room(lobby.id, bob.id, "bob", T0 + 3).expect("leave");
    assert_eq!((leave.seq, leave.kind, leave.author.as_str(), leave.text.as_str()), (3, DeltaKind::LEAVE, "bob", ""));
    assert!(!store.is_member(lobby.id, bob.id).expect("is_member"));
    let err = store.leave_room(lobby.id, bob.id, "bob", T0 + 4).expect_err("not a member");
    assert!(matches!(err, StoreError::NotMember(r) if r == lobby.id), "{err:?}");
    let err = store.leave_room(lobby.id + 1000, bob.id, "bob", T0 + 4).expect_err("no such room");
    assert!(matches!(err, StoreError::NotMember(_)), "{err:?}");

    // Rejoining after leaving is a new membership with its own delta.
    let rejoin = store.join_room(lobby.id, bob.id, "bob", T0 + 5).expect("rejoin").expect("a JOIN delta");
    assert_eq!(rejoin.seq, 4);
    let kinds: Vec<DeltaKind> = log(store, lobby.id).iter().map(|d| d.kind).collect();
    assert_eq!(kinds, [DeltaKind::CREATE, DeltaKind::JOIN, DeltaKind::LEAVE, DeltaKind::JOIN]);
    assert_eq!(seqs(&log(store, lobby.id)), [1, 2, 3, 4]);
}

fn rooms_of_user(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let a = room(store, "a", &ada);
    let b = room(store, "b", &ada);
    let c = room(store, "c", &bob);
    store.join_room(a.id, bob.id, "bob", T0).expect("join");
    let ids = |rooms: Vec<RoomRecord>| rooms.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(store.rooms_of_user(ada.id).expect("ada's rooms")), [a.id, b.id]);
    assert_eq!(ids(store.rooms_of_user(bob.id).expect("bob's rooms")), [a.id, c.id]);
    // The records carry each room's head.
    let bobs = store.rooms_of_user(bob.id).expect("bob's rooms");
    assert_eq!(bobs[0], RoomRecord { last_seq: 2, ..a });
    store.leave_room(a.id, bob.id, "bob", T0).expect("leave");
    assert_eq!(ids(store.rooms_of_user(bob.id).expect("bob's rooms")), [c.id]);
    assert!(store.rooms_of_user(9_999).expect("unknown user").is_empty());
}

fn members_are_paged(store: &mut dyn Store) {
    let owner = user(store, "owner");
    let lobby = room(store, "lobby", &owner);
    let mut all = vec![(owner.id, "owner".to_string(), "owner")];
    for i in 0..6 {
        let u = user(store, &format!("m{i}"));
        store.join_room(lobby.id, u.id, &u.name, T0).expect("join");
        all.push((u.id, u.name, "member"));
    }
    all.sort();
    let mut pages = Vec::new();
    let mut after = 0;
    loop {
        let page = store.members(lobby.id, after, 3).expect("page");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = last.user_id;
        pages.push(page);
    }
    assert_eq!(pages.len(), 3, "7 members in pages of 3");
    let got: Vec<(u64, String, &str)> = pages
        .iter()
        .flatten()
        .inspect(|m| assert!(!m.muted))
        .map(|m| (m.user_id, m.name.clone(), m.role.as_str()))
        .collect();
    let want: Vec<(u64, String, &str)> = all.iter().map(|(id, name, role)| (*id, name.clone(), *role)).collect();
    assert_eq!(got, want);
    assert!(store.members(lobby.id + 1000, 0, 10).expect("no room").is_empty());
    assert!(store.members(lobby.id, 0, 0).expect("limit 0").is_empty());
}

fn posts_take_contiguous_seqs_in_input_order(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let r1 = room(store, "r1", &ada);
    let r2 = room(store, "r2", &bob);
    store.join_room(r2.id, ada.id, "ada", T0).expect("join"); // r2 seq 2
    assert!(store.append_posts(&[]).expect("empty batch").is_empty());

    let batch = [
        post(r1.id, &ada, "k1", "one"),
        post(r2.id, &ada, "k1", "uno"),
        post(r1.id, &ada, "k2", "two"),
        post(r2.id, &bob, "k1", "dos"),
        post(r1.id, &ada, "", "three"),
        post(r2.id, &ada, "", "tres"),
    ];
    let outcomes = store.append_posts(&batch).expect("append");
    let got: Vec<(RoomId, u64)> = outcomes.iter().map(inserted).map(|d| (d.room, d.seq)).collect();
    assert_eq!(got, [(r1.id, 2), (r2.id, 3), (r1.id, 3), (r2.id, 4), (r1.id, 4), (r2.id, 5)]);
    for (outcome, post) in outcomes.iter().zip(&batch) {
        let d = inserted(outcome);
        assert_eq!(
            (d.kind, d.author_id, d.author.as_str(), d.text.as_str(), d.ts_ms),
            (DeltaKind::MESSAGE, post.author_id, post.author.as_str(), post.text.as_str(), post.now_ms)
        );
    }
    // The log holds exactly what was returned, after the earlier deltas.
    for r in [r1.id, r2.id] {
        let returned: Vec<Delta> = outcomes.iter().map(inserted).filter(|d| d.room == r).cloned().collect();
        let logged = log(store, r);
        assert_eq!(logged[logged.len() - returned.len()..], returned[..]);
        assert_eq!(seqs(&logged), (1..=logged.len() as u64).collect::<Vec<_>>());
        assert_eq!(store.room(r).expect("room").expect("exists").last_seq, logged.len() as u64);
    }
    // A later batch continues where this one stopped.
    let next = store.append_posts(&[post(r1.id, &ada, "k3", "four")]).expect("append");
    assert_eq!(inserted(&next[0]).seq, 5);
}

fn duplicate_keys_write_nothing(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let r = room(store, "r", &ada);
    store.join_room(r.id, bob.id, "bob", T0).expect("join"); // seq 2

    let mut retry = post(r.id, &ada, "same", "first text");
    retry.now_ms = T0 + 99;
    let first = store
        .append_posts(&[post(r.id, &ada, "same", "first text"), retry.clone(), post(r.id, &bob, "same", "bob's")])
        .expect("append");
    let d = inserted(&first[0]).clone();
    assert_eq!(d.seq, 3);
    assert_eq!(first[1], PostOutcome::Duplicate { seq: 3, ts_ms: d.ts_ms }, "repeat within a batch");
    // Keys are per author: bob's "same" is a different post.
    assert_eq!(inserted(&first[2]).seq, 4);

    let again =
        store.append_posts(&[post(r.id, &bob, "new", "x"), retry, post(r.id, &bob, "same", "y")]).expect("append");
    assert_eq!(inserted(&again[0]).seq, 5);
    assert_eq!(again[1], PostOutcome::Duplicate { seq: 3, ts_ms: d.ts_ms }, "repeat across batches");
    assert_eq!(again[2], PostOutcome::Duplicate { seq: 4, ts_ms: T0 + 5 });

    let logged = log(store, r.id);
    assert_eq!(seqs(&logged), [1, 2, 3, 4, 5], "duplicates take no seq");
    assert_eq!(logged[2], d, "the first text stays");
    assert_eq!(store.room(r.id).expect("room").expect("exists").last_seq, 5);
}

fn non_members_write_nothing(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let eve = user(store, "eve");
    let r = room(store, "r", &ada);
    let outcomes = store
        .append_posts(&[
            post(r.id, &ada, "a", "kept"),
            post(r.id, &eve, "e", "not a member"),
            post(r.id + 1000, &ada, "x", "no such room"),
            post(r.id, &ada, "b", "kept too"),
        ])
        .expect("append");
    assert_eq!(inserted(&outcomes[0]).seq, 2);
    assert_eq!(outcomes[1], PostOutcome::NotMember);
    assert_eq!(outcomes[2], PostOutcome::NotMember);
    assert_eq!(inserted(&outcomes[3]).seq, 3);
    let texts: Vec<String> = log(store, r.id).into_iter().map(|d| d.text).collect();
    assert_eq!(texts, ["r", "kept", "kept too"]);
    assert!(log(store, r.id + 1000).is_empty());

    // Once eve joins, her key was never used, so the same post now goes in.
    store.join_room(r.id, eve.id, "eve", T0).expect("join");
    let later = store.append_posts(&[post(r.id, &eve, "e", "now a member")]).expect("append");
    assert_eq!(inserted(&later[0]).seq, 5);
}

fn deltas_after_pages(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let r = room(store, "r", &ada);
    let batch: Vec<NewPost> = (0..10).map(|i| post(r.id, &ada, &format!("k{i}"), &format!("m{i}"))).collect();
    store.append_posts(&batch).expect("append");
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store.deltas_after(r.id, after, 3).expect("page");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = last.seq;
        seen.extend(page);
    }
    assert_eq!(seqs(&seen), (1..=11).collect::<Vec<_>>());
    assert!(seen.iter().all(|d| d.room == r.id && d.author == "ada"));
    assert_eq!(seen[1].text, "m0");
    assert_eq!(seqs(&store.deltas_after(r.id, 9, 100).expect("tail")), [10, 11]);
    assert!(store.deltas_after(r.id, 11, 100).expect("at head").is_empty());
    assert!(store.deltas_after(r.id, u64::MAX, 100).expect("past head").is_empty());
    assert!(store.deltas_after(r.id, 0, 0).expect("limit 0").is_empty());
}

/// Writers on separate connections posting into the same rooms at once: every post gets a seq,
/// each room's log is 1..=N exactly once, and nothing fails with "database is busy" or a
/// deadlock (batches span two rooms, in both orders).
fn concurrent_writers_leave_no_gaps(db: &Db) {
    const WRITERS: usize = 4;
    const BATCHES: usize = 25;
    let mut setup = db.open();
    let owner = user(&mut *setup, "owner");
    let rooms = [room(&mut *setup, "a", &owner).id, room(&mut *setup, "b", &owner).id];
    let writers: Vec<UserRecord> = (0..WRITERS)
        .map(|w| {
            let u = user(&mut *setup, &format!("w{w}"));
            for r in rooms {
                setup.join_room(r, u.id, &u.name, T0).expect("join");
            }
            u
        })
        .collect();

    let results: Vec<Vec<(NewPost, PostOutcome)>> = thread::scope(|s| {
        let handles: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(w, author)| {
                s.spawn(move || {
                    let mut store = db.open();
                    let mut done = Vec::new();
                    for b in 0..BATCHES {
                        let size = 1 + (w + b) % 4;
                        let batch: Vec<NewPost> = (0..size)
                            .map(|i| {
                                let r = rooms[(w + b + i) % 2];
                                post(r, author, &format!("{w}-{b}-{i}"), &format!("w{w} b{b} p{i}"))
                            })
                            .collect();
                        let outcomes = store.append_posts(&batch).expect("concurrent append");
                        done.extend(batch.into_iter().zip(outcomes));
                    }
                    done
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("writer thread")).collect()
    });

    let mut returned: BTreeMap<(RoomId, u64), String> = BTreeMap::new();
    for (post, outcome) in results.iter().flatten() {
        let d = inserted(outcome);
        assert_eq!((d.room, d.text.as_str()), (post.room, post.text.as_str()));
        assert!(
            returned.insert((d.room, d.seq), d.text.clone()).is_none(),
            "seq {} of room {} handed out twice",
            d.seq,
            d.room
        );
    }
    let mut check = db.open();
    for r in rooms {
        let logged = log(&mut *check, r);
        assert_eq!(seqs(&logged), (1..=logged.len() as u64).collect::<Vec<_>>(), "room {r} has gaps");
        let messages: Vec<&Delta> = logged.iter().filter(|d| d.kind == DeltaKind::MESSAGE).collect();
        assert_eq!(messages.len(), returned.keys().filter(|(room, _)| *room == r).count());
        for d in messages {
            assert_eq!(returned.get(&(r, d.seq)), Some(&d.text), "the log and the outcomes disagree");
        }
        assert_eq!(check.room(r).expect("room").expect("exists").last_seq, logged.len() as u64);
    }
    // Within one writer, seqs in a room increase in the order it posted.
    for writer in &results {
        for r in rooms {
            let mine: Vec<u64> =
                writer.iter().map(|(_, o)| inserted(o)).filter(|d| d.room == r).map(|d| d.seq).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        }
    }
}

/// Workers of a freshly started daemon all open the new database at once: migrations must run
/// once, and every connection must come up.
fn concurrent_opens_migrate_once(db: &Db) {
    let names: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                s.spawn(move || {
                    let mut store = db.open();
                    user(&mut *store, &format!("u{i}")).name
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("opener thread")).collect()
    });
    let mut store = db.open();
    for name in names {
        assert!(store.user_by_name(&name).expect("lookup").is_some());
    }
}

/// What one connection committed, a new connection sees after the first is gone.
fn reopening_keeps_everything(db: &Db) {
    let (ada, r, last) = {
        let mut store = db.open();
        let ada = user(&mut *store, "ada");
        let r = room(&mut *store, "r", &ada);
        store
            .create_session(&NewSession {
                user_id: ada.id,
                token_hash: [7; 32],
                ip: "::1".into(),
                user_agent: "t".into(),
                now_ms: T0,
            })
            .expect("session");
        let out = store.append_posts(&[post(r.id, &ada, "k", "persisted")]).expect("append");
        (ada, r, inserted(&out[0]).clone())
    };
    let mut store = db.open();
    assert_eq!(store.user_by_name("ada").expect("lookup"), Some(ada.clone()));
    assert_eq!(store.session_user(&[7; 32], T0 + 1).expect("session"), Some(ada.clone()));
    assert_eq!(log(&mut *store, r.id).last(), Some(&last));
    assert_eq!(store.rooms_of_user(ada.id).expect("rooms"), [RoomRecord { last_seq: 2, ..r.clone() }]);
    // A retry after the restart is still recognised, and new posts continue the log.
    let out =
        store.append_posts(&[post(r.id, &ada, "k", "persisted"), post(r.id, &ada, "k2", "after")]).expect("append");
    assert_eq!(out[0], PostOutcome::Duplicate { seq: last.seq, ts_ms: last.ts_ms });
    assert_eq!(inserted(&out[1]).seq, 3);
}
