//! One conformance suite for `chime-storage`: every check is written once and runs unchanged
//! against the embedded SQLite store and a real throwaway PostgreSQL, so the two cannot drift.
//!
//! Checks taking `&mut dyn Store` get a store on a fresh database; checks taking `&Db` open as
//! many connections to a fresh database as they need (concurrency, reopening). What only one
//! database can show (a PostgreSQL backend terminated under the store; SQLite's locks, full disk
//! and checkpoints) is tested at the end of this file and in the store's own unit tests.

use std::collections::BTreeMap;
use std::thread;

use chime_storage::{
    search, ActionOutcome, DeltaRecord, MemberAction, MemberRecord, MessageAction, MessageRecord, ModerationOutcome,
    NewAction, NewChannel, NewModeration, NewPost, NewServer, NewSession, NotifyLevel, OpenOptions, Order, Permissions,
    PostOutcome, ProfileRecord, ProfileUpdate, PushReason, RecordKind, RoomId, RoomKind, RoomRecord, Seq, ServerId,
    SessionLimits, SessionRecord, SettingWrite, SettingsRecord, Store, StoreError, UserId, UserRecord,
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
        self.open_with(&OpenOptions::default())
    }

    fn open_with(&self, options: &OpenOptions) -> Box<dyn Store> {
        match chime_storage::open_with(&self.url, options) {
            Ok(store) => store,
            Err(e) => panic!("opening {}: {e:?}", self.url),
        }
    }

    /// Runs SQL on the database directly, around the store.
    fn execute(&self, sql: &str) {
        match self.url.strip_prefix("sqlite:") {
            Some(path) => rusqlite::Connection::open(path).and_then(|c| c.execute_batch(sql)).expect("sqlite"),
            None => ::postgres::Client::connect(&self.url, ::postgres::NoTls)
                .and_then(|mut c| c.batch_execute(sql))
                .expect("postgres"),
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
        sessions_expire,
        ping_on_a_healthy_store,
        create_room_starts_the_log,
        join_and_leave,
        room_details_count_members_without_counting_rows,
        rooms_per_user_are_capped,
        rooms_of_user,
        members_are_paged,
        posts_take_contiguous_seqs_in_input_order,
        duplicate_keys_write_nothing,
        non_members_write_nothing,
        deltas_after_pages,
        message_actions_change_state_through_new_deltas,
        actions_are_judged_by_role_and_authorship,
        one_direct_dialog_per_pair,
        every_role_against_every_action,
        moderation_changes_membership_and_posting,
        servers_give_access_to_channels_by_role,
        unread_counts_follow_read_cursors_and_mentions,
        calls_are_signalled_as_deltas,
        files_are_shared_forwarded_and_collected,
        profiles_start_empty_and_change_field_by_field,
        emails_are_unique_without_regard_to_case,
        settings_round_trip_and_bump_the_version,
        notify_levels_need_a_membership_and_are_paged,
        search_finds_messages_by_their_current_words,
        search_is_for_members_and_pages_newest_first,
        secret_rooms_are_never_indexed,
        push_targets_are_mentions_and_direct_peers_who_allow_it,
        private_servers_take_invitations_and_bans_hold,
        last_seen_is_the_latest_use_of_any_session,
    ],
    db: [
        concurrent_writers_leave_no_gaps,
        concurrent_joins_respect_the_room_cap,
        concurrent_claims_of_an_email_have_one_winner,
        concurrent_opens_migrate_once,
        reopening_keeps_everything,
        open_with_options,
        direct_dialogs_race_to_one_room,
        restore_pages_cross_partitions_both_ways,
        partitions_record_every_append,
        migrations_partition_and_index_existing_logs,
        secret_rooms_seal_text_and_deletes_destroy_it,
    ],
}

const T0: i64 = 1_700_000_000_000;

/// A room cap no check but the cap's own comes near.
const MAX_ROOMS: u64 = 1_000;

/// Sessions die after 1 s unused or 10 s after login.
const LIMITS: SessionLimits = SessionLimits { idle_ms: 1_000, max_age_ms: 10_000 };

/// Limits under which every session not revoked is live: what is listed then is what is stored.
const FOREVER: SessionLimits = SessionLimits { idle_ms: i64::MAX, max_age_ms: i64::MAX };

fn user(store: &mut dyn Store, name: &str) -> UserRecord {
    store.create_user(name, &format!("$argon2id$hash-of-{name}")).expect("create user")
}

fn room(store: &mut dyn Store, name: &str, owner: &UserRecord) -> RoomRecord {
    store.create_room(name, RoomKind::GROUP, owner.id, &owner.name, T0, MAX_ROOMS).expect("create room").0
}

/// A new session of `user` at `now_ms`, whose token hash is `[token; 32]`.
fn new_session(user: &UserRecord, token: u8, now_ms: i64) -> NewSession {
    NewSession {
        user_id: user.id,
        token_hash: [token; 32],
        ip: format!("10.0.0.{token}"),
        user_agent: format!("chime-test/{token}"),
        now_ms,
    }
}

/// Logs in with `[token; 32]` and returns the session, or `None` when it is not live.
fn login(store: &mut dyn Store, token: u8, now_ms: i64) -> Option<SessionRecord> {
    store.session_user(&[token; 32], now_ms, &LIMITS).expect("session_user").map(|(_, session)| session)
}

fn ids(sessions: &[SessionRecord]) -> Vec<u64> {
    sessions.iter().map(|s| s.id).collect()
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

fn inserted(outcome: &PostOutcome) -> &DeltaRecord {
    match outcome {
        PostOutcome::Inserted(delta) => delta,
        other => panic!("expected an inserted delta, got {other:?}"),
    }
}

fn log(store: &mut dyn Store, room: RoomId) -> Vec<DeltaRecord> {
    store.deltas_after(room, Seq(0), 10_000).expect("deltas")
}

fn seqs(deltas: &[DeltaRecord]) -> Vec<u64> {
    deltas.iter().map(|d| d.seq.get()).collect()
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
    let bob = user(store, "bob");
    let a1 = store.create_session(&new_session(&ada, 1, T0)).expect("session a1");
    let expected = SessionRecord {
        id: a1.id,
        user_id: ada.id,
        ip: "10.0.0.1".into(),
        user_agent: "chime-test/1".into(),
        created_at_ms: T0,
        last_used_at_ms: T0,
    };
    assert_eq!(a1, expected);
    let a2 = store.create_session(&new_session(&ada, 2, T0 + 10)).expect("session a2");
    let b1 = store.create_session(&new_session(&bob, 3, T0 + 20)).expect("session b1");
    assert!(a1.id != a2.id && a2.id != b1.id && a1.id != b1.id);
    let err = store.create_session(&new_session(&bob, 1, T0)).expect_err("token hash taken");
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    assert_eq!(store.list_sessions(ada.id, T0 + 30, &LIMITS).expect("list"), [a1.clone(), a2.clone()]);
    assert_eq!(store.list_sessions(bob.id, T0 + 30, &LIMITS).expect("list"), std::slice::from_ref(&b1));
    assert!(store.list_sessions(UserId(9_999), T0, &LIMITS).expect("unknown user").is_empty());

    // Logging in records the use and returns the user and the updated session.
    let (who, session) = store.session_user(&[1; 32], T0 + 100, &LIMITS).expect("lookup").expect("live");
    assert_eq!((who, session), (ada.clone(), SessionRecord { last_used_at_ms: T0 + 100, ..a1.clone() }));
    // A clock that stepped back does not move the last use back.
    assert_eq!(login(store, 1, T0 + 50).expect("live").last_used_at_ms, T0 + 100);
    assert_eq!(store.session_user(&[9; 32], T0, &LIMITS).expect("unknown token"), None);

    // touch_sessions only ever moves the last use forward, and skips sessions it does not know.
    store.touch_sessions(&[a2.id], T0 + 500).expect("touch");
    store.touch_sessions(&[a2.id], T0 + 400).expect("touch with an older time");
    store.touch_sessions(&[9_999], T0 + 500).expect("touch an unknown session");
    store.touch_sessions(&[], T0 + 500).expect("touch nothing");
    let listed = store.list_sessions(ada.id, T0 + 500, &LIMITS).expect("list");
    assert_eq!(listed.iter().map(|s| s.last_used_at_ms).collect::<Vec<_>>(), [T0 + 100, T0 + 500]);

    // Revoking one session by id: only the user's own.
    assert!(store.revoke_sessions(ada.id, Some(b1.id), T0 + 600).expect("revoke bob's").is_empty());
    assert!(login(store, 3, T0 + 600).is_some(), "bob's session survives ada naming it");
    assert_eq!(store.revoke_sessions(ada.id, Some(a1.id), T0 + 600).expect("revoke a1"), [a1.id]);
    assert!(store.revoke_sessions(ada.id, Some(a1.id), T0 + 601).expect("revoke a1 again").is_empty());
    assert!(store.revoke_sessions(ada.id, Some(9_999), T0 + 601).expect("revoke unknown").is_empty());
    assert_eq!(login(store, 1, T0 + 601), None);
    assert_eq!(ids(&store.list_sessions(ada.id, T0 + 601, &FOREVER).expect("list")), [a2.id]);
    // A revoked session stays revoked: touching it neither revives it nor fails.
    store.touch_sessions(&[a1.id], T0 + 602).expect("touch a revoked session");
    assert_eq!(login(store, 1, T0 + 603), None);

    // Revoking all of a user's sessions.
    let a3 = store.create_session(&new_session(&ada, 4, T0 + 700)).expect("session a3");
    assert_eq!(store.revoke_sessions(ada.id, None, T0 + 800).expect("revoke all"), [a2.id, a3.id]);
    assert!(store.revoke_sessions(ada.id, None, T0 + 801).expect("revoke all again").is_empty());
    assert!(store.list_sessions(ada.id, T0 + 801, &FOREVER).expect("list").is_empty());
    assert_eq!(login(store, 2, T0 + 801), None);
    assert_eq!(login(store, 4, T0 + 801), None);
    assert_eq!(ids(&store.list_sessions(bob.id, T0 + 801, &LIMITS).expect("bob's")), [b1.id]);
}

fn sessions_expire(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let idle = store.create_session(&new_session(&ada, 1, T0)).expect("idle session");

    // Idle: live up to exactly `idle_ms` after its last use. Listing only reads.
    assert_eq!(ids(&store.list_sessions(ada.id, T0 + 1_000, &LIMITS).expect("list")), [idle.id]);
    assert!(store.list_sessions(ada.id, T0 + 1_001, &LIMITS).expect("list").is_empty());
    assert_eq!(ids(&store.list_sessions(ada.id, T0 + 1_001, &FOREVER).expect("list")), [idle.id]);
    // Logging in with an expired session revokes it: it stays dead under any limits.
    assert_eq!(login(store, 1, T0 + 1_001), None);
    assert_eq!(store.session_user(&[1; 32], T0 + 1_002, &FOREVER).expect("lookup"), None);
    assert!(store.list_sessions(ada.id, T0 + 1_002, &FOREVER).expect("list").is_empty());
    assert!(store.revoke_sessions(ada.id, Some(idle.id), T0 + 1_003).expect("revoke").is_empty(), "already revoked");

    // Max age: live up to exactly `max_age_ms` after login, however recently used.
    let start = T0 + 2_000;
    store.create_session(&new_session(&ada, 2, start)).expect("busy session");
    for now in (start + 900..start + 10_000).step_by(900) {
        assert!(login(store, 2, now).is_some(), "busy session at {now}");
    }
    assert_eq!(login(store, 2, start + 10_000).expect("live at max age").last_used_at_ms, start + 10_000);
    assert!(store.list_sessions(ada.id, start + 10_001, &LIMITS).expect("list").is_empty());
    assert_eq!(login(store, 2, start + 10_001), None);
    assert!(store.list_sessions(ada.id, start + 10_002, &FOREVER).expect("list").is_empty());

    // A connection that stayed open all along touches its session when it closes, so idle time
    // counts from then, not from its login.
    let connected = store.create_session(&new_session(&ada, 3, start)).expect("connected session");
    store.touch_sessions(&[connected.id, 9_999], start + 5_000).expect("touch");
    assert_eq!(ids(&store.list_sessions(ada.id, start + 5_900, &LIMITS).expect("list")), [connected.id]);
    assert_eq!(login(store, 3, start + 5_900).expect("live").last_used_at_ms, start + 5_900);
}

fn ping_on_a_healthy_store(store: &mut dyn Store) {
    store.ping().expect("ping");
    store.ping().expect("ping again");
    store.checkpoint().expect("checkpoint");
    // The probe leaves the store as it was.
    let ada = user(store, "ada");
    store.ping().expect("ping after a write");
    assert_eq!(store.user_by_name("ada").expect("lookup"), Some(ada));
}

fn create_room_starts_the_log(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let (room, delta) = store.create_room("lobby", RoomKind::GROUP, ada.id, "ada", T0, MAX_ROOMS).expect("create");
    assert_eq!((room.name.as_str(), room.kind, room.last_seq), ("lobby", RoomKind::GROUP, Seq(1)));
    let expected = DeltaRecord {
        room: room.id,
        seq: Seq(1),
        kind: RecordKind::CREATE,
        author_id: ada.id,
        author: "ada".into(),
        ts_ms: T0,
        body: "lobby".into(),
        target: None,
    };
    assert_eq!(delta, expected);
    assert_eq!(log(store, room.id), [expected]);
    assert_eq!(store.room(room.id).expect("room"), Some(room.clone()));
    assert_eq!(store.room(RoomId(room.id.get() + 1000)).expect("no room"), None);
    assert!(store.is_member(room.id, ada.id).expect("is_member"));
    let owner = MemberRecord { user_id: ada.id, name: "ada".into(), role: "owner".into(), muted: false };
    assert_eq!(store.members(room.id, UserId(0), 10).expect("members"), [owner]);
    let other = store.create_room("lobby", RoomKind::GROUP, ada.id, "ada", T0, MAX_ROOMS).expect("same name").0;
    assert_ne!(other.id, room.id, "room names need not be unique");
}

fn join_and_leave(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let lobby = room(store, "lobby", &ada);

    let join = store.join_room(lobby.id, bob.id, "bob", T0 + 1, MAX_ROOMS).expect("join").expect("a JOIN delta");
    assert_eq!(
        join,
        DeltaRecord {
            room: lobby.id,
            seq: Seq(2),
            kind: RecordKind::JOIN,
            author_id: bob.id,
            author: "bob".into(),
            ts_ms: T0 + 1,
            body: String::new(),
            target: None,
        }
    );
    assert!(store.is_member(lobby.id, bob.id).expect("is_member"));
    assert_eq!(store.join_room(lobby.id, bob.id, "bob", T0 + 2, MAX_ROOMS).expect("join twice"), None);
    assert_eq!(store.join_room(lobby.id, ada.id, "ada", T0 + 2, MAX_ROOMS).expect("owner joins"), None);
    assert_eq!(store.room(lobby.id).expect("room").expect("exists").last_seq, 2, "no seq for a no-op join");

    let err = store.join_room(RoomId(lobby.id.get() + 1000), bob.id, "bob", T0, MAX_ROOMS).expect_err("no such room");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    let leave = store.leave_room(lobby.id, bob.id, "bob", T0 + 3).expect("leave");
    assert_eq!(
        (leave.seq, leave.kind, leave.author.as_str(), leave.body.as_str()),
        (Seq(3), RecordKind::LEAVE, "bob", "")
    );
    assert!(!store.is_member(lobby.id, bob.id).expect("is_member"));
    let err = store.leave_room(lobby.id, bob.id, "bob", T0 + 4).expect_err("not a member");
    assert!(matches!(err, StoreError::NotMember(r) if r == lobby.id), "{err:?}");
    let err = store.leave_room(RoomId(lobby.id.get() + 1000), bob.id, "bob", T0 + 4).expect_err("no such room");
    assert!(matches!(err, StoreError::NotMember(_)), "{err:?}");

    // Rejoining after leaving is a new membership with its own delta.
    let rejoin = store.join_room(lobby.id, bob.id, "bob", T0 + 5, MAX_ROOMS).expect("rejoin").expect("a JOIN delta");
    assert_eq!(rejoin.seq, 4);
    let kinds: Vec<RecordKind> = log(store, lobby.id).iter().map(|d| d.kind).collect();
    assert_eq!(kinds, [RecordKind::CREATE, RecordKind::JOIN, RecordKind::LEAVE, RecordKind::JOIN]);
    assert_eq!(seqs(&log(store, lobby.id)), [1, 2, 3, 4]);
}

/// The member count follows every join and leave (a no-op join changes nothing), and the role is
/// the asker's; it is kept in the room's row, not counted.
fn room_details_count_members_without_counting_rows(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let cy = user(store, "cy");
    let lobby = room(store, "lobby", &ada);
    let details = |store: &mut dyn Store, who: &UserRecord| {
        let d = store.room_details(lobby.id, who.id).expect("details").expect("the room exists");
        (d.members, d.role)
    };
    assert_eq!(details(store, &ada), (1, Some("owner".into())));
    assert_eq!(details(store, &bob), (1, None), "a stranger sees the count but has no role");
    store.join_room(lobby.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    store.join_room(lobby.id, bob.id, "bob", T0, MAX_ROOMS).expect("join again");
    store.join_room(lobby.id, cy.id, "cy", T0, MAX_ROOMS).expect("join");
    assert_eq!(details(store, &bob), (3, Some("member".into())));
    store.leave_room(lobby.id, cy.id, "cy", T0).expect("leave");
    assert_eq!(details(store, &ada), (2, Some("owner".into())));
    let d = store.room_details(lobby.id, ada.id).expect("details").expect("exists");
    assert_eq!((d.room.name.as_str(), d.room.last_seq), ("lobby", Seq(4)), "CREATE, 2 JOINs, a LEAVE");
    assert_eq!(store.room_details(RoomId(lobby.id.get() + 1000), ada.id).expect("details"), None);
}

fn rooms_per_user_are_capped(store: &mut dyn Store) {
    const CAP: u64 = 2;
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let cara = user(store, "cara");
    let bobs = room(store, "bob's", &bob);
    let caras = room(store, "cara's", &cara);
    let (own, _) = store.create_room("ada's", RoomKind::GROUP, ada.id, "ada", T0, CAP).expect("first room");
    store.join_room(bobs.id, ada.id, "ada", T0, CAP).expect("second room").expect("a JOIN delta");
    let mine = store.rooms_of_user(ada.id).expect("ada's rooms");
    assert_eq!(mine.len(), 2);

    // At the cap, creating or joining a room is refused and writes nothing.
    let err = store.create_room("one too many", RoomKind::GROUP, ada.id, "ada", T0, CAP).expect_err("at the cap");
    assert!(matches!(err, StoreError::LimitReached(_)), "{err:?}");
    let err = store.join_room(caras.id, ada.id, "ada", T0, CAP).expect_err("at the cap");
    assert!(matches!(err, StoreError::LimitReached(_)), "{err:?}");
    assert_eq!(store.rooms_of_user(ada.id).expect("ada's rooms"), mine);
    assert!(!store.is_member(caras.id, ada.id).expect("is_member"));
    assert_eq!(store.members(caras.id, UserId(0), 10).expect("members").len(), 1);
    assert_eq!(seqs(&log(store, caras.id)), [1], "no JOIN delta");
    assert_eq!(store.room(caras.id).expect("room").expect("exists").last_seq, 1);
    for id in (own.id.get() + 1..=own.id.get() + 3).map(RoomId) {
        assert_eq!(store.room(id).expect("room"), None, "no room was created");
    }

    // Rooms one is in already are no new membership: still Ok(None) at the cap.
    assert_eq!(store.join_room(bobs.id, ada.id, "ada", T0, CAP).expect("rejoin"), None);
    assert_eq!(store.join_room(own.id, ada.id, "ada", T0, CAP).expect("rejoin own"), None);
    let err = store.join_room(RoomId(caras.id.get() + 1_000), ada.id, "ada", T0, CAP).expect_err("no such room");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    // Leaving frees a place; other users are not affected by ada's count.
    store.leave_room(bobs.id, ada.id, "ada", T0 + 1).expect("leave");
    let join = store.join_room(caras.id, ada.id, "ada", T0 + 2, CAP).expect("join").expect("a JOIN delta");
    assert_eq!(join.seq, 2);
    store.join_room(caras.id, bob.id, "bob", T0 + 3, CAP).expect("bob joins").expect("a JOIN delta");
    // A cap of zero allows no room at all.
    let err = store.create_room("none", RoomKind::GROUP, cara.id, "cara", T0, 0).expect_err("cap 0");
    assert!(matches!(err, StoreError::LimitReached(_)), "{err:?}");
}

fn rooms_of_user(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let a = room(store, "a", &ada);
    let b = room(store, "b", &ada);
    let c = room(store, "c", &bob);
    store.join_room(a.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    let ids = |rooms: Vec<RoomRecord>| rooms.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(store.rooms_of_user(ada.id).expect("ada's rooms")), [a.id, b.id]);
    assert_eq!(ids(store.rooms_of_user(bob.id).expect("bob's rooms")), [a.id, c.id]);
    // Paged: by id, after a cursor, at most `limit`.
    assert_eq!(ids(store.rooms_page(ada.id, RoomId(0), 1).expect("page 1")), [a.id]);
    assert_eq!(ids(store.rooms_page(ada.id, a.id, 1).expect("page 2")), [b.id]);
    assert!(store.rooms_page(ada.id, b.id, 1).expect("past the end").is_empty());
    assert_eq!(ids(store.rooms_page(bob.id, RoomId(0), 10).expect("all")), [a.id, c.id]);
    // The records carry each room's head.
    let bobs = store.rooms_of_user(bob.id).expect("bob's rooms");
    assert_eq!(bobs[0], RoomRecord { last_seq: Seq(2), ..a });
    store.leave_room(a.id, bob.id, "bob", T0).expect("leave");
    assert_eq!(ids(store.rooms_of_user(bob.id).expect("bob's rooms")), [c.id]);
    assert!(store.rooms_of_user(UserId(9_999)).expect("unknown user").is_empty());
}

fn members_are_paged(store: &mut dyn Store) {
    let owner = user(store, "owner");
    let lobby = room(store, "lobby", &owner);
    let mut all = vec![(owner.id, "owner".to_string(), "owner")];
    for i in 0..6 {
        let u = user(store, &format!("m{i}"));
        store.join_room(lobby.id, u.id, &u.name, T0, MAX_ROOMS).expect("join");
        all.push((u.id, u.name, "member"));
    }
    all.sort();
    let mut pages = Vec::new();
    let mut after = Default::default();
    loop {
        let page = store.members(lobby.id, after, 3).expect("page");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = last.user_id;
        pages.push(page);
    }
    assert_eq!(pages.len(), 3, "7 members in pages of 3");
    let got: Vec<(UserId, String, &str)> = pages
        .iter()
        .flatten()
        .inspect(|m| assert!(!m.muted))
        .map(|m| (m.user_id, m.name.clone(), m.role.as_str()))
        .collect();
    let want: Vec<(UserId, String, &str)> = all.iter().map(|(id, name, role)| (*id, name.clone(), *role)).collect();
    assert_eq!(got, want);
    assert!(store.members(RoomId(lobby.id.get() + 1000), UserId(0), 10).expect("no room").is_empty());
    assert!(store.members(lobby.id, UserId(0), 0).expect("limit 0").is_empty());
}

fn posts_take_contiguous_seqs_in_input_order(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let r1 = room(store, "r1", &ada);
    let r2 = room(store, "r2", &bob);
    store.join_room(r2.id, ada.id, "ada", T0, MAX_ROOMS).expect("join"); // r2 seq 2
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
    let got: Vec<(RoomId, u64)> = outcomes.iter().map(inserted).map(|d| (d.room, d.seq.get())).collect();
    assert_eq!(got, [(r1.id, 2), (r2.id, 3), (r1.id, 3), (r2.id, 4), (r1.id, 4), (r2.id, 5)]);
    for (outcome, post) in outcomes.iter().zip(&batch) {
        let d = inserted(outcome);
        assert_eq!(
            (d.kind, d.author_id, d.author.as_str(), d.body.as_str(), d.ts_ms),
            (RecordKind::MESSAGE, post.author_id, post.author.as_str(), post.text.as_str(), post.now_ms)
        );
    }
    // The log holds exactly what was returned, after the earlier deltas.
    for r in [r1.id, r2.id] {
        let returned: Vec<DeltaRecord> = outcomes.iter().map(inserted).filter(|d| d.room == r).cloned().collect();
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
    store.join_room(r.id, bob.id, "bob", T0, MAX_ROOMS).expect("join"); // seq 2

    let mut retry = post(r.id, &ada, "same", "first text");
    retry.now_ms = T0 + 99;
    let first = store
        .append_posts(&[post(r.id, &ada, "same", "first text"), retry.clone(), post(r.id, &bob, "same", "bob's")])
        .expect("append");
    let d = inserted(&first[0]).clone();
    assert_eq!(d.seq, 3);
    assert_eq!(first[1], PostOutcome::Duplicate { seq: Seq(3), ts_ms: d.ts_ms }, "repeat within a batch");
    // Keys are per author: bob's "same" is a different post.
    assert_eq!(inserted(&first[2]).seq, 4);

    let again =
        store.append_posts(&[post(r.id, &bob, "new", "x"), retry, post(r.id, &bob, "same", "y")]).expect("append");
    assert_eq!(inserted(&again[0]).seq, 5);
    assert_eq!(again[1], PostOutcome::Duplicate { seq: Seq(3), ts_ms: d.ts_ms }, "repeat across batches");
    assert_eq!(again[2], PostOutcome::Duplicate { seq: Seq(4), ts_ms: T0 + 5 });

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
            post(RoomId(r.id.get() + 1000), &ada, "x", "no such room"),
            post(r.id, &ada, "b", "kept too"),
        ])
        .expect("append");
    assert_eq!(inserted(&outcomes[0]).seq, 2);
    assert_eq!(outcomes[1], PostOutcome::NotMember);
    assert_eq!(outcomes[2], PostOutcome::NotMember);
    assert_eq!(inserted(&outcomes[3]).seq, 3);
    let texts: Vec<String> = log(store, r.id).into_iter().map(|d| d.body).collect();
    assert_eq!(texts, ["r", "kept", "kept too"]);
    assert!(log(store, RoomId(r.id.get() + 1000)).is_empty());

    // Once eve joins, her key was never used, so the same post now goes in.
    store.join_room(r.id, eve.id, "eve", T0, MAX_ROOMS).expect("join");
    let later = store.append_posts(&[post(r.id, &eve, "e", "now a member")]).expect("append");
    assert_eq!(inserted(&later[0]).seq, 5);
}

fn deltas_after_pages(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let r = room(store, "r", &ada);
    let batch: Vec<NewPost> = (0..10).map(|i| post(r.id, &ada, &format!("k{i}"), &format!("m{i}"))).collect();
    store.append_posts(&batch).expect("append");
    let mut seen = Vec::new();
    let mut after = Default::default();
    loop {
        let page = store.deltas_after(r.id, after, 3).expect("page");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = last.seq;
        seen.extend(page);
    }
    assert_eq!(seqs(&seen), (1..=11).collect::<Vec<_>>());
    assert!(seen.iter().all(|d| d.room == r.id && d.author == "ada"));
    assert_eq!(seen[1].body, "m0");
    assert_eq!(seqs(&store.deltas_after(r.id, Seq(9), 100).expect("tail")), [10, 11]);
    assert!(store.deltas_after(r.id, Seq(11), 100).expect("at head").is_empty());
    assert!(store.deltas_after(r.id, Seq(u64::MAX), 100).expect("past head").is_empty());
    assert!(store.deltas_after(r.id, Seq(0), 0).expect("limit 0").is_empty());
}

fn email(address: &str) -> ProfileUpdate {
    ProfileUpdate { email: Some(Some(address.into())), display_name: None }
}

/// A new user has no email and no display name; an update changes only the fields it names,
/// returns the profile after it, and a profile is found by id and by name.
fn profiles_start_empty_and_change_field_by_field(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let fresh = ProfileRecord { id: ada.id, name: "ada".into(), email: None, display_name: None };
    assert_eq!(store.profile(ada.id).expect("profile"), Some(fresh.clone()));
    assert_eq!(store.profile_by_name("ada").expect("profile"), Some(fresh.clone()));
    assert_eq!(store.profile(UserId(ada.id.get() + 1000)).expect("profile"), None);
    assert_eq!(store.profile_by_name("nobody").expect("profile"), None);
    assert_eq!(store.update_profile(ada.id, &ProfileUpdate::default()).expect("no change"), fresh);

    let named = ProfileUpdate { email: None, display_name: Some("Ada L.".into()) };
    let after = store.update_profile(ada.id, &named).expect("display name");
    assert_eq!(after, ProfileRecord { display_name: Some("Ada L.".into()), ..fresh.clone() });
    // The address is kept as typed.
    let after = store.update_profile(ada.id, &email("Ada@Example.ORG")).expect("email");
    assert_eq!(after.email.as_deref(), Some("Ada@Example.ORG"));
    assert_eq!(after.display_name.as_deref(), Some("Ada L."), "an email change leaves the name alone");
    let both = ProfileUpdate { email: Some(None), display_name: Some("Ada".into()) };
    let after = store.update_profile(ada.id, &both).expect("both");
    assert_eq!((after.email, after.display_name.as_deref()), (None, Some("Ada")));
    assert_eq!(store.profile_by_name("ada").expect("profile").expect("ada").display_name.as_deref(), Some("Ada"));

    let err = store.update_profile(UserId(ada.id.get() + 1000), &named).expect_err("no such user");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

/// `A@x.org` and `a@X.org` are the same address: the second claim is a `Conflict` naming it,
/// and writes nothing. Re-casing one's own address, clearing it and letting someone else take it
/// all work.
fn emails_are_unique_without_regard_to_case(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    store.update_profile(ada.id, &email("A@x.org")).expect("ada's email");
    let taken = ProfileUpdate { email: Some(Some("a@X.org".into())), display_name: Some("Bob".into()) };
    let err = store.update_profile(bob.id, &taken).expect_err("taken");
    match &err {
        StoreError::Conflict(message) => assert!(message.contains("a@X.org"), "{message}"),
        other => panic!("{other:?}"),
    }
    let bob_now = store.profile(bob.id).expect("profile").expect("bob");
    assert_eq!((bob_now.email, bob_now.display_name), (None, None), "a refused update writes nothing");
    // Non-ASCII letters fold too, the same way on both stores.
    store.update_profile(bob.id, &email("ÉMILE@x.org")).expect("bob's email");
    let err = store.update_profile(ada.id, &email("émile@X.ORG")).expect_err("taken, in other case");
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    assert_eq!(
        store.update_profile(ada.id, &email("a@X.ORG")).expect("own, re-cased").email.as_deref(),
        Some("a@X.ORG")
    );
    store.update_profile(ada.id, &ProfileUpdate { email: Some(None), display_name: None }).expect("clear");
    store.update_profile(bob.id, &email("a@x.org")).expect("free again");
    assert_eq!(store.profile(bob.id).expect("profile").expect("bob").email.as_deref(), Some("a@x.org"));
    // Any number of users may have none.
    let cy = user(store, "cy");
    store.update_profile(cy.id, &ProfileUpdate { email: Some(None), display_name: None }).expect("none again");
    assert_eq!(store.profile(ada.id).expect("profile").expect("ada").email, None);
}

/// Account-wide settings are stored as set (a second write replaces the first), every write
/// bumps the version, and what was never set is not listed (the defaults are the daemon's).
fn settings_round_trip_and_bump_the_version(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    assert_eq!(store.settings(ada.id, RoomId(0), 100).expect("settings"), SettingsRecord::default());
    let auto_load = |value| SettingWrite::Account { key: "media.auto_load", value };
    assert_eq!(store.set_setting(ada.id, &auto_load("false")).expect("set"), 1);
    let low = SettingWrite::Account { key: "media.low_quality_images", value: "true" };
    assert_eq!(store.set_setting(ada.id, &low).expect("set"), 2);
    assert_eq!(store.set_setting(ada.id, &auto_load("true")).expect("set again"), 3);
    let pairs = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    assert_eq!(
        store.settings(ada.id, RoomId(0), 100).expect("settings"),
        SettingsRecord {
            version: 3,
            account: pairs(&[("media.auto_load", "true"), ("media.low_quality_images", "true")]),
            notify: Vec::new(),
        }
    );
    // Each user's own.
    assert_eq!(store.settings(bob.id, RoomId(0), 100).expect("bob's"), SettingsRecord::default());
    let ghost = UserId(bob.id.get() + 1000);
    let err = store.set_setting(ghost, &auto_load("false")).expect_err("no such user");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = store.settings(ghost, RoomId(0), 100).expect_err("no such user");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

/// A notification level is the member's: refused (and the version left alone) for a room the
/// user is not in or that does not exist, listed while it is not `All`, paged by room id, and
/// gone with the membership.
fn notify_levels_need_a_membership_and_are_paged(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let rooms: Vec<RoomId> = (0..4).map(|i| room(store, &format!("r{i}"), &ada).id).collect();
    let theirs = room(store, "bob's", &bob).id;
    let set = |room, level| SettingWrite::Notify { room, level };
    assert_eq!(store.set_setting(ada.id, &set(rooms[0], NotifyLevel::Mentions)).expect("r0"), 1);
    let err = store.set_setting(ada.id, &set(theirs, NotifyLevel::Nothing)).expect_err("not a member");
    assert!(matches!(err, StoreError::NotMember(r) if r == theirs), "{err:?}");
    let err = store.set_setting(ada.id, &set(RoomId(theirs.get() + 1000), NotifyLevel::Nothing)).expect_err("no room");
    assert!(matches!(err, StoreError::NotMember(_)), "{err:?}");
    assert_eq!(store.settings(ada.id, RoomId(0), 100).expect("settings").version, 1, "refusals bump nothing");

    store.set_setting(ada.id, &set(rooms[1], NotifyLevel::Nothing)).expect("r1");
    store.set_setting(ada.id, &set(rooms[2], NotifyLevel::Mentions)).expect("r2");
    assert_eq!(store.set_setting(ada.id, &set(rooms[3], NotifyLevel::All)).expect("r3 at the default"), 4);
    let all = store.settings(ada.id, RoomId(0), 100).expect("settings");
    let expected =
        vec![(rooms[0], NotifyLevel::Mentions), (rooms[1], NotifyLevel::Nothing), (rooms[2], NotifyLevel::Mentions)];
    assert_eq!(all, SettingsRecord { version: 4, account: Vec::new(), notify: expected.clone() });
    let first = store.settings(ada.id, RoomId(0), 2).expect("page 1");
    assert_eq!(first.notify, expected[..2]);
    let second = store.settings(ada.id, rooms[1], 2).expect("page 2");
    assert_eq!(second.notify, expected[2..]);
    // Back to the default: no longer listed.
    store.set_setting(ada.id, &set(rooms[0], NotifyLevel::All)).expect("r0 back");
    assert_eq!(store.settings(ada.id, RoomId(0), 100).expect("settings").notify, expected[1..]);
    // Another member's level is theirs alone.
    store.join_room(rooms[1], bob.id, "bob", T0, MAX_ROOMS).expect("bob joins");
    assert_eq!(store.settings(bob.id, RoomId(0), 100).expect("bob's").notify, []);
    // Leaving drops it; rejoining starts at the default.
    store.leave_room(rooms[1], ada.id, "ada", T0).expect("leave");
    store.join_room(rooms[1], ada.id, "ada", T0, MAX_ROOMS).expect("rejoin");
    assert_eq!(store.settings(ada.id, RoomId(0), 100).expect("settings").notify, expected[2..]);
}

/// Users on separate connections claiming one address, each spelled in its own case, at once:
/// exactly one gets it.
fn concurrent_claims_of_an_email_have_one_winner(db: &Db) {
    const CLAIMS: usize = 6;
    let mut setup = db.open();
    let users: Vec<UserRecord> = (0..CLAIMS).map(|i| user(&mut *setup, &format!("u{i}"))).collect();
    let outcomes: Vec<Result<ProfileRecord, StoreError>> = thread::scope(|s| {
        let handles: Vec<_> = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let address = if i % 2 == 0 { "Same@Example.org" } else { "same@example.ORG" };
                s.spawn(move || db.open().update_profile(u.id, &email(address)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("claiming thread")).collect()
    });
    let won = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused = outcomes.iter().filter(|o| matches!(o, Err(StoreError::Conflict(_)))).count();
    assert_eq!((won, refused), (1, CLAIMS - 1), "{outcomes:?}");
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
                setup.join_room(r, u.id, &u.name, T0, MAX_ROOMS).expect("join");
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
        assert_eq!((d.room, d.body.as_str()), (post.room, post.text.as_str()));
        assert!(
            returned.insert((d.room, d.seq.get()), d.body.clone()).is_none(),
            "seq {} of room {} handed out twice",
            d.seq,
            d.room
        );
    }
    let mut check = db.open();
    for r in rooms {
        let logged = log(&mut *check, r);
        assert_eq!(seqs(&logged), (1..=logged.len() as u64).collect::<Vec<_>>(), "room {r} has gaps");
        let messages: Vec<&DeltaRecord> = logged.iter().filter(|d| d.kind == RecordKind::MESSAGE).collect();
        assert_eq!(messages.len(), returned.keys().filter(|(room, _)| *room == r).count());
        for d in messages {
            assert_eq!(returned.get(&(r, d.seq.get())), Some(&d.body), "the log and the outcomes disagree");
        }
        assert_eq!(check.room(r).expect("room").expect("exists").last_seq, logged.len() as u64);
    }
    // Within one writer, seqs in a room increase in the order it posted.
    for writer in &results {
        for r in rooms {
            let mine: Vec<u64> =
                writer.iter().map(|(_, o)| inserted(o)).filter(|d| d.room == r).map(|d| d.seq.get()).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        }
    }
}

/// The same user joining many rooms at once from separate connections: each join holds only its
/// own room's lock, yet no more than the cap get in.
fn concurrent_joins_respect_the_room_cap(db: &Db) {
    const ROOMS: usize = 8;
    const CAP: u64 = 3;
    let mut setup = db.open();
    let owner = user(&mut *setup, "owner");
    let ada = user(&mut *setup, "ada");
    let rooms: Vec<RoomId> = (0..ROOMS).map(|i| room(&mut *setup, &format!("r{i}"), &owner).id).collect();
    let outcomes: Vec<Result<Option<DeltaRecord>, StoreError>> = thread::scope(|s| {
        let handles: Vec<_> = rooms
            .iter()
            .map(|&r| {
                let ada = &ada;
                s.spawn(move || db.open().join_room(r, ada.id, &ada.name, T0, CAP))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("joining thread")).collect()
    });
    let joined = outcomes.iter().filter(|o| matches!(o, Ok(Some(_)))).count();
    let refused = outcomes.iter().filter(|o| matches!(o, Err(StoreError::LimitReached(_)))).count();
    assert_eq!((joined, refused), (CAP as usize, ROOMS - CAP as usize), "{outcomes:?}");
    assert_eq!(setup.rooms_of_user(ada.id).expect("ada's rooms").len(), CAP as usize);
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
        store.create_session(&new_session(&ada, 7, T0)).expect("session");
        let out = store.append_posts(&[post(r.id, &ada, "k", "persisted")]).expect("append");
        (ada, r, inserted(&out[0]).clone())
    };
    let mut store = db.open();
    assert_eq!(store.user_by_name("ada").expect("lookup"), Some(ada.clone()));
    let (who, _) = store.session_user(&[7; 32], T0 + 1, &LIMITS).expect("session").expect("live");
    assert_eq!(who, ada);
    assert_eq!(log(&mut *store, r.id).last(), Some(&last));
    assert_eq!(store.rooms_of_user(ada.id).expect("rooms"), [RoomRecord { last_seq: Seq(2), ..r.clone() }]);
    // A retry after the restart is still recognised, and new posts continue the log.
    let out =
        store.append_posts(&[post(r.id, &ada, "k", "persisted"), post(r.id, &ada, "k2", "after")]).expect("append");
    assert_eq!(out[0], PostOutcome::Duplicate { seq: last.seq, ts_ms: last.ts_ms });
    assert_eq!(inserted(&out[1]).seq, 3);
}

/// `open_with` passes its options to either store; a store opened for manual checkpoints works
/// and checkpoints on request.
fn open_with_options(db: &Db) {
    let options = OpenOptions {
        busy_timeout: std::time::Duration::from_secs(1),
        connect_timeout: std::time::Duration::from_secs(5),
        manual_checkpoints: true,
        partition_size: 3,
        secret_keys: None,
    };
    let mut store = chime_storage::open_with(&db.url, &options).expect("open_with");
    let ada = user(&mut *store, "ada");
    store.ping().expect("ping");
    store.checkpoint().expect("checkpoint");
    assert_eq!(db.open().user_by_name("ada").expect("lookup"), Some(ada));
}

/// A partition size small enough that a few dozen deltas span several partitions.
const SMALL_PARTS: u64 = 7;

fn small_parts() -> OpenOptions {
    OpenOptions { partition_size: SMALL_PARTS, ..OpenOptions::default() }
}

/// Posts `n` messages "m1", "m2", ... to `room` in group commits of the given sizes, in turn,
/// with idempotency keys `tag0`, `tag1`, ...
fn post_many(store: &mut dyn Store, room: RoomId, author: &UserRecord, tag: &str, n: usize, batches: &[usize]) {
    let mut sent = 0;
    for size in batches.iter().cycle() {
        if sent >= n {
            break;
        }
        let batch: Vec<NewPost> = (sent..n.min(sent + size))
            .map(|i| post(room, author, &format!("{tag}{i}"), &format!("m{}", i + 1)))
            .collect();
        sent += batch.len();
        store.append_posts(&batch).expect("append");
    }
}

/// Every seq of a room's log, read with `deltas_page` from one end to the other in pages of
/// `limit`, as a restore would.
fn restore_seqs(store: &mut dyn Store, room: RoomId, order: Order, head: u64, limit: u32) -> Vec<u64> {
    let mut cursor = match order {
        Order::OldestFirst => Seq(0),
        Order::NewestFirst => Seq(head + 1),
    };
    let mut seen = Vec::new();
    loop {
        let page = store.deltas_page(room, order, cursor, limit).expect("page");
        assert!(page.len() <= limit as usize);
        let Some(last) = page.last() else { return seen };
        seen.extend(seqs(&page));
        cursor = last.seq;
    }
}

/// RESTORE's reads: a page's seq range follows from its cursor, in either direction, across
/// partition boundaries, and walking the pages gives every seq once in order.
fn restore_pages_cross_partitions_both_ways(db: &Db) {
    let mut store = db.open_with(&small_parts());
    let store = &mut *store;
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let r = room(store, "big", &ada);
    post_many(store, r.id, &ada, "a", 30, &[13, 1, 9]);
    store.join_room(r.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    applied(store.act(&action(r.id, 5, &ada, MessageAction::Edit { text: "m4 again".into() }, "e")).expect("edit"));
    post_many(store, r.id, &bob, "b", 8, &[8]);
    // 1 create + 30 + join + edit + 8.
    let head = 41;
    assert_eq!(store.room(r.id).expect("room").expect("exists").last_seq, head);

    let page = |store: &mut dyn Store, order, cursor: u64, limit| {
        seqs(&store.deltas_page(r.id, order, Seq(cursor), limit).expect("page"))
    };
    assert_eq!(page(store, Order::OldestFirst, 0, 10), (1..=10).collect::<Vec<_>>());
    assert_eq!(page(store, Order::OldestFirst, 6, 3), [7, 8, 9], "across the boundary after 7");
    assert_eq!(page(store, Order::OldestFirst, 35, 10), (36..=41).collect::<Vec<_>>());
    assert!(page(store, Order::OldestFirst, 41, 10).is_empty());
    assert_eq!(page(store, Order::NewestFirst, 42, 4), [41, 40, 39, 38]);
    assert_eq!(page(store, Order::NewestFirst, 16, 3), [15, 14, 13]);
    assert_eq!(page(store, Order::NewestFirst, 5, 10), [4, 3, 2, 1]);
    assert!(page(store, Order::NewestFirst, 1, 10).is_empty());
    assert!(page(store, Order::OldestFirst, 0, 0).is_empty());
    // The deltas are the log's, whatever the direction.
    let both = store.deltas_page(r.id, Order::NewestFirst, Seq(34), 2).expect("page");
    let forward = store.deltas_page(r.id, Order::OldestFirst, Seq(31), 2).expect("page");
    assert_eq!(both.iter().rev().cloned().collect::<Vec<_>>(), forward);
    assert_eq!((forward[0].kind, forward[1].kind), (RecordKind::JOIN, RecordKind::EDIT));
    assert_eq!(forward[1].target, Some(Seq(5)));

    for limit in [1, 6, 7, 8, 1000] {
        assert_eq!(restore_seqs(store, r.id, Order::OldestFirst, head, limit), (1..=head).collect::<Vec<_>>());
        assert_eq!(restore_seqs(store, r.id, Order::NewestFirst, head, limit), (1..=head).rev().collect::<Vec<_>>());
    }
}

/// Every kind of append (create, posts in batches of every size, joins, leaves, actions) keeps
/// `delta_partitions` exact; a room keeps the partition size it was created with.
fn partitions_record_every_append(db: &Db) {
    let mut store = db.open_with(&small_parts());
    let store = &mut *store;
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let r = room(store, "parts", &ada);
    post_many(store, r.id, &ada, "a", 12, &[5, 1, 20]);
    store.join_room(r.id, bob.id, "bob", T0 + 7, MAX_ROOMS).expect("join");
    applied(store.act(&action(r.id, 2, &bob, MessageAction::React { emoji: "x".into() }, "")).expect("react"));
    store.leave_room(r.id, bob.id, "bob", T0 + 9).expect("leave");
    let expected = |head: u64, size: u64| -> Vec<(u64, u64, u64, u64)> {
        (0..head.div_ceil(size))
            .map(|p| {
                let (first, last) = (p * size + 1, ((p + 1) * size).min(head));
                (p, first, last, last - first + 1)
            })
            .collect()
    };
    let brief = |store: &mut dyn Store, room: RoomId| -> Vec<(u64, u64, u64, u64)> {
        let parts = store.partitions(room).expect("partitions");
        assert!(parts.iter().all(|p| p.room == room && p.first_ts_ms <= p.last_ts_ms));
        parts.iter().map(|p| (p.part, p.first_seq.get(), p.last_seq.get(), p.count)).collect()
    };
    assert_eq!(brief(store, r.id), expected(16, SMALL_PARTS));
    let parts = store.partitions(r.id).expect("partitions");
    assert_eq!((parts[0].first_ts_ms, parts[0].last_ts_ms), (T0, T0 + 5), "the create, then posts");
    // Seqs 15 and 16: the reaction at T0 + 50, then the leave stamped T0 + 9 (a clock that went
    // back): the times are a range, not the ends' times.
    assert_eq!((parts[2].first_ts_ms, parts[2].last_ts_ms), (T0 + 9, T0 + 50));

    // A store with another size makes new rooms with it, and leaves the old room's alone.
    let mut other = db.open_with(&OpenOptions { partition_size: 5, ..OpenOptions::default() });
    let other = &mut *other;
    let r2 = room(other, "fives", &ada);
    post_many(other, r2.id, &ada, "a", 11, &[11]);
    post_many(other, r.id, &ada, "later", 3, &[3]);
    assert_eq!(brief(other, r2.id), expected(12, 5));
    assert_eq!(brief(other, r.id), expected(19, SMALL_PARTS));
    assert!(other.partitions(RoomId(9_999)).expect("no room").is_empty());
}

fn search_words(store: &mut dyn Store, room: RoomId, who: &UserRecord, query: &str) -> Vec<MessageRecord> {
    let words = search::parse_query(query).expect("a query");
    store.search(room, who.id, &words, Seq::ZERO, 100).expect("search")
}

fn found(store: &mut dyn Store, room: RoomId, who: &UserRecord, query: &str) -> Vec<u64> {
    search_words(store, room, who, query).iter().map(|m| m.seq.get()).collect()
}

/// Search finds messages and replies by all of their words, case-insensitively, newest first, by
/// their latest text; deleted messages never; nothing a query holds is search syntax.
fn search_finds_messages_by_their_current_words(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let r = room(store, "talk", &ada);
    store.join_room(r.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    store
        .append_posts(&[
            post(r.id, &ada, "k1", "The quick brown fox"),
            post(r.id, &bob, "k2", "Lazy dog, sleeping."),
            post(r.id, &ada, "k3", "quick thinking!"),
            post(r.id, &bob, "k4", "Naïve café in İstanbul"),
            post(r.id, &ada, "k5", r#""quick" OR NOT * NEAR(x) -- ' \ ;"#),
        ])
        .expect("posts");
    // seqs: 2 join, 3..=7 the posts.
    let reply = applied(
        store.act(&action(r.id, 4, &bob, MessageAction::Reply { text: "A QUICK reply".into() }, "r")).expect("reply"),
    );
    assert_eq!(reply.seq, 8);
    let other = room(store, "elsewhere", &ada);
    store.append_posts(&[post(other.id, &ada, "o1", "quick brown fox elsewhere")]).expect("post");

    assert_eq!(found(store, r.id, &ada, "quick"), [8, 7, 5, 3]);
    assert_eq!(found(store, r.id, &ada, "QUICK Brown"), [3], "every word, any case");
    assert_eq!(found(store, r.id, &ada, "brown quick fox"), [3]);
    assert!(found(store, r.id, &ada, "quick dog").is_empty());
    assert!(found(store, r.id, &ada, "qui").is_empty(), "whole words");
    assert_eq!(found(store, r.id, &ada, "naïve"), [6]);
    assert!(found(store, r.id, &ada, "naive").is_empty(), "no accent folding");
    assert_eq!(found(store, r.id, &ada, "café İSTANBUL"), [6]);
    assert_eq!(found(store, r.id, &ada, r#""quick" OR NOT"#), [7], "syntax is only words");
    assert_eq!(found(store, r.id, &ada, "near x"), [7]);
    let hits = search_words(store, r.id, &ada, "reply");
    assert_eq!((hits[0].seq, hits[0].reply_to, hits[0].author.as_str()), (Seq(8), Some(Seq(4)), "bob"));

    // An edit is found by its new words only; a delete by none.
    applied(
        store.act(&action(r.id, 5, &ada, MessageAction::Edit { text: "slow thinking".into() }, "e")).expect("edit"),
    );
    assert_eq!(found(store, r.id, &ada, "quick"), [8, 7, 3]);
    let slow = search_words(store, r.id, &ada, "slow");
    assert_eq!(slow.len(), 1);
    assert_eq!((slow[0].seq, slow[0].text.as_deref()), (Seq(5), Some("slow thinking")));
    assert!(slow[0].edited_ms.is_some());
    applied(store.act(&action(r.id, 5, &ada, MessageAction::Edit { text: "quick again".into() }, "e2")).expect("edit"));
    assert_eq!(found(store, r.id, &ada, "quick"), [8, 7, 5, 3]);
    assert!(found(store, r.id, &ada, "slow").is_empty());
    applied(store.act(&action(r.id, 3, &ada, MessageAction::Delete, "")).expect("delete"));
    assert!(found(store, r.id, &ada, "fox").is_empty());
    assert_eq!(found(store, r.id, &ada, "quick"), [8, 7, 5]);
    applied(store.act(&action(r.id, 8, &ada, MessageAction::Delete, "")).expect("delete a reply"));
    assert_eq!(found(store, r.id, &ada, "quick"), [7, 5]);
    // Results are messages in their current state, reactions and all.
    applied(store.act(&action(r.id, 7, &bob, MessageAction::React { emoji: "+1".into() }, "")).expect("react"));
    applied(store.act(&action(r.id, 7, &ada, MessageAction::Pin, "")).expect("pin"));
    let hit = &search_words(store, r.id, &ada, "near")[0];
    assert!(hit.pinned);
    assert_eq!(hit.reactions, [("+1".to_string(), 1, false)]);
    assert_eq!(search_words(store, r.id, &bob, "near")[0].reactions, [("+1".to_string(), 1, true)]);
    assert_eq!(view(store, r.id, &ada).iter().find(|m| m.seq == 7), Some(hit), "the same state VIEW shows");
}

/// Search is for members; pages go from the newest back with `before`.
fn search_is_for_members_and_pages_newest_first(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let eve = user(store, "eve");
    let r = room(store, "pages", &ada);
    let texts: Vec<String> =
        (1..=25).map(|i| format!("page {i} {}", if i % 2 == 0 { "even" } else { "odd" })).collect();
    let posts: Vec<NewPost> = texts.iter().enumerate().map(|(i, t)| post(r.id, &ada, &format!("k{i}"), t)).collect();
    store.append_posts(&posts).expect("posts");
    // Message i is seq i + 1.
    let words = search::parse_query("page").expect("query");
    let mut before = Seq::ZERO;
    let mut all = Vec::new();
    loop {
        let page = store.search(r.id, ada.id, &words, before, 10).expect("search");
        all.extend(page.iter().map(|m| m.seq.get()));
        if page.len() < 10 {
            break;
        }
        before = page.last().expect("full").seq;
    }
    assert_eq!(all, (2..=26).rev().collect::<Vec<_>>());
    let even = search::parse_query("EVEN page").expect("query");
    let page = store.search(r.id, ada.id, &even, Seq(20), 3).expect("search");
    assert_eq!(page.iter().map(|m| m.seq.get()).collect::<Vec<_>>(), [19, 17, 15]);
    assert_eq!(page[0].text.as_deref(), Some("page 18 even"));

    let err = store.search(r.id, eve.id, &words, Seq::ZERO, 10).expect_err("not a member");
    assert!(matches!(err, StoreError::NotMember(_)), "{err:?}");
    let err = store.search(RoomId(9_999), ada.id, &words, Seq::ZERO, 10).expect_err("no room");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert!(store.search(r.id, ada.id, &[], Seq::ZERO, 10).expect("no words").is_empty());
}

/// The hook for secret rooms: a room of kind 2 (reserved for them) has nothing indexed, whether
/// posted, replied or edited.
fn secret_rooms_are_never_indexed(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let (secret, _) = store.create_room("shh", RoomKind(2), ada.id, "ada", T0, MAX_ROOMS).expect("room");
    store.append_posts(&[post(secret.id, &ada, "k", "classified words")]).expect("post");
    applied(
        store
            .act(&action(secret.id, 2, &ada, MessageAction::Reply { text: "classified reply".into() }, "r"))
            .expect("reply"),
    );
    applied(
        store
            .act(&action(secret.id, 2, &ada, MessageAction::Edit { text: "classified edit".into() }, "e"))
            .expect("edit"),
    );
    assert!(found(store, secret.id, &ada, "classified").is_empty());
    assert_eq!(view(store, secret.id, &ada).len(), 2, "the messages are there, only not indexed");
}

/// A database as the release before partitions and search left it: opening the store migrates
/// it, recording the partitions of its logs and indexing its messages as they read now.
fn migrations_partition_and_index_existing_logs(db: &Db) {
    chime_storage::migrate_to(&db.url, 6).expect("migrate to V6");
    db.execute(
        "INSERT INTO users (name, password_hash, created_at) VALUES ('ada', 'h', 1);
         INSERT INTO rooms (name, kind, last_seq, created_by, created_at) VALUES ('old', 1, 12006, 1, 1);
         INSERT INTO room_members (room_id, user_id, role, muted, joined_at) VALUES (1, 1, 'owner', FALSE, 1);
         INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at) VALUES
             (1, 1, 1, 1, 'old', 1), (1, 2, 2, 1, 'Hello World', 2), (1, 3, 2, 1, 'hello again', 3),
             (1, 4, 9, 1, 'a hello reply', 4), (1, 5, 2, 1, 'gone hello', 5);
         INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at, target) VALUES
             (1, 6, 5, 1, 'goodbye words', 6, 3), (1, 7, 6, 1, '', 7, 5);
         UPDATE deltas SET target = 2 WHERE seq = 4;
         INSERT INTO message_state (room_id, seq, text, edited_at) VALUES (1, 3, 'goodbye words', 6);
         INSERT INTO message_state (room_id, seq, deleted_seq) VALUES (1, 5, 7);",
    );
    // Enough deltas for a second partition of the default size.
    let filler: Vec<String> = (8..=12_006).map(|seq| format!("(1, {seq}, 2, 1, 'filler {seq}', {seq})")).collect();
    db.execute(&format!(
        "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at) VALUES {};",
        filler.join(", ")
    ));
    let mut store = db.open();
    let store = &mut *store;
    let ada = store.user_by_name("ada").expect("lookup").expect("ada");
    let r = RoomId(1);
    let parts = store.partitions(r).expect("partitions");
    let brief: Vec<_> = parts.iter().map(|p| (p.part, p.first_seq.get(), p.last_seq.get(), p.count)).collect();
    assert_eq!(brief, [(0, 1, 10_000, 10_000), (1, 10_001, 12_006, 2_006)]);
    assert_eq!((parts[1].first_ts_ms, parts[1].last_ts_ms), (10_001, 12_006));
    assert_eq!(found(store, r, &ada, "hello"), [4, 2], "the edited and the deleted are not found by old words");
    assert_eq!(found(store, r, &ada, "goodbye"), [3]);
    assert_eq!(found(store, r, &ada, "filler 12006"), [12_006]);
    // The log goes on where it was, partitions and index included.
    let out = store.append_posts(&[post(r, &ada, "new", "hello from the new release")]).expect("post");
    assert_eq!(inserted(&out[0]).seq, 12_007);
    assert_eq!(found(store, r, &ada, "hello"), [12_007, 4, 2]);
    assert_eq!(store.partitions(r).expect("partitions")[1].count, 2_007);
    assert_eq!(restore_seqs(store, r, Order::NewestFirst, 12_007, 1000).len(), 12_007);
}

/// What only PostgreSQL can show.
mod postgres_only {
    use super::*;

    /// The server ends the store's connection (an administrator, a restart, a failover): every
    /// later call says `Unavailable`, and a newly opened store carries on with the data.
    #[test]
    fn a_terminated_connection_is_unavailable_and_a_new_store_works() {
        let Some(server) = postgres::shared() else { return };
        let url = server.create_database("terminated");
        let mut store = chime_storage::open(&url).expect("open");
        let ada = user(&mut *store, "ada");
        // The store names its connection `chime`; this database is the test's own. The timeout
        // makes the call wait until the backend is gone.
        let terminated = server
            .psql(
                &url,
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'chime'",
            )
            .expect("psql");
        assert_eq!(terminated, "t", "exactly one backend terminated");

        let err = store.ping().expect_err("connection terminated");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        let err = store.user_by_name("ada").expect_err("still terminated");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        let err = store.create_user("bob", "hash").expect_err("still terminated");
        assert!(err.is_unavailable(), "{err:?}");
        drop(store);

        let mut store = chime_storage::open(&url).expect("reopen");
        store.ping().expect("ping");
        assert_eq!(store.user_by_name("ada").expect("lookup"), Some(ada));
        user(&mut *store, "bob");
    }

    /// What waiting will not fix is a configuration error, not an outage to wait out.
    #[test]
    fn an_unknown_database_or_role_is_a_config_error() {
        let Some(server) = postgres::shared() else { return };
        let port = server.port();
        for url in [
            format!("postgres://postgres@127.0.0.1:{port}/no_such_database"),
            format!("postgres://nobody@127.0.0.1:{port}/chime"),
        ] {
            let err = chime_storage::open(&url).err().expect("cannot connect");
            assert!(matches!(err, StoreError::Config(_)), "{url}: {err:?}");
        }
    }
}

fn action(room: RoomId, target: u64, who: &UserRecord, action: MessageAction, key: &str) -> NewAction {
    NewAction {
        room,
        target: Seq(target),
        actor: who.id,
        actor_name: who.name.clone(),
        action,
        idempotency_key: key.into(),
        now_ms: T0 + 50,
    }
}

fn applied(outcome: ActionOutcome) -> DeltaRecord {
    match outcome {
        ActionOutcome::Applied(d) => d,
        other => panic!("expected a new delta, got {other:?}"),
    }
}

fn view(store: &mut dyn Store, room: RoomId, who: &UserRecord) -> Vec<MessageRecord> {
    store.messages_before(room, who.id, Seq::ZERO, 100).expect("messages_before")
}

fn message_actions_change_state_through_new_deltas(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let lobby = room(store, "lobby", &ada);
    store.join_room(lobby.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    store.append_posts(&[post(lobby.id, &ada, "k1", "hello"), post(lobby.id, &bob, "k2", "hi ada")]).expect("posts");
    // seq 3 is ada's, 4 bob's.
    let edit = applied(
        store.act(&action(lobby.id, 3, &ada, MessageAction::Edit { text: "hello!".into() }, "e1")).expect("edit"),
    );
    assert_eq!(
        (edit.seq, edit.kind, edit.body.as_str(), edit.target),
        (Seq(5), RecordKind::EDIT, "hello!", Some(Seq(3)))
    );
    let again =
        store.act(&action(lobby.id, 3, &ada, MessageAction::Edit { text: "other".into() }, "e1")).expect("retry");
    assert_eq!(again, ActionOutcome::Unchanged { seq: Seq(5), ts_ms: T0 + 50 }, "a retried edit writes nothing");
    let thumbs = || MessageAction::React { emoji: "\u{1f44d}".into() };
    let r1 = applied(store.act(&action(lobby.id, 3, &ada, thumbs(), "")).expect("react"));
    applied(store.act(&action(lobby.id, 3, &bob, thumbs(), "")).expect("react"));
    assert_eq!(
        store.act(&action(lobby.id, 3, &ada, thumbs(), "")).expect("again"),
        ActionOutcome::Unchanged { seq: r1.seq, ts_ms: T0 + 50 }
    );
    let reply = applied(
        store.act(&action(lobby.id, 3, &bob, MessageAction::Reply { text: "yes".into() }, "r1")).expect("reply"),
    );
    applied(store.act(&action(lobby.id, 4, &ada, MessageAction::Pin, "")).expect("pin"));
    let gone = applied(store.act(&action(lobby.id, 4, &bob, MessageAction::Delete, "")).expect("delete own"));
    assert_eq!(
        store.act(&action(lobby.id, 4, &bob, MessageAction::Delete, "")).expect("twice"),
        ActionOutcome::Unchanged { seq: gone.seq, ts_ms: T0 + 50 }
    );
    let unreact = MessageAction::Unreact { emoji: "\u{1f44d}".into() };
    applied(store.act(&action(lobby.id, 3, &bob, unreact.clone(), "")).expect("unreact"));
    let err = store.act(&action(lobby.id, 3, &bob, unreact, "")).expect_err("no reaction left");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = store.act(&action(lobby.id, 4, &ada, thumbs(), "")).expect_err("deleted");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = store.act(&action(lobby.id, 1, &ada, MessageAction::Pin, "")).expect_err("CREATE is no message");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = store.act(&action(lobby.id, 99, &ada, MessageAction::Pin, "")).expect_err("past the head");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    // The log holds every step; the original is untouched.
    let kinds: Vec<(u64, RecordKind)> = log(store, lobby.id).iter().map(|d| (d.seq.get(), d.kind)).collect();
    assert_eq!(
        kinds[2..],
        [
            (3, RecordKind::MESSAGE),
            (4, RecordKind::MESSAGE),
            (5, RecordKind::EDIT),
            (6, RecordKind::REACT),
            (7, RecordKind::REACT),
            (8, RecordKind::REPLY),
            (9, RecordKind::PIN),
            (10, RecordKind::DELETE),
            (11, RecordKind::UNREACT)
        ]
    );
    assert_eq!(log(store, lobby.id)[2].body, "hello");

    let seen = view(store, lobby.id, &ada);
    assert_eq!(seen.iter().map(|m| m.seq.get()).collect::<Vec<_>>(), [8, 4, 3], "newest first, messages only");
    let (r, b, a) = (&seen[0], &seen[1], &seen[2]);
    assert_eq!((r.text.as_deref(), r.reply_to, r.author.as_str()), (Some("yes"), Some(Seq(3)), "bob"));
    assert_eq!(reply.seq, Seq(8));
    assert_eq!((b.text.as_deref(), b.deleted, b.pinned), (None, true, true));
    assert_eq!((a.text.as_deref(), a.edited_ms, a.deleted), (Some("hello!"), Some(T0 + 50), false));
    assert_eq!(a.reactions, [("\u{1f44d}".to_string(), 1, true)]);
    assert_eq!(view(store, lobby.id, &bob)[2].reactions, [("\u{1f44d}".to_string(), 1, false)]);
    let older = store.messages_before(lobby.id, ada.id, Seq(4), 100).expect("page");
    assert_eq!(older.iter().map(|m| m.seq.get()).collect::<Vec<_>>(), [3]);
    let carol = user(store, "carol");
    assert!(matches!(store.messages_before(lobby.id, carol.id, Seq::ZERO, 10), Err(StoreError::NotMember(_))));
    let err = store.act(&action(lobby.id, 3, &carol, thumbs(), "")).expect_err("stranger");
    assert!(matches!(err, StoreError::NotMember(_)), "{err:?}");
}

/// Every action against the owner's and a member's role, on their own message and another's.
fn actions_are_judged_by_role_and_authorship(store: &mut dyn Store) {
    let ada = user(store, "ada"); // owner
    let bob = user(store, "bob"); // member
    let lobby = room(store, "lobby", &ada);
    store.join_room(lobby.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    type Make = fn() -> MessageAction;
    let actions: Vec<(&str, Make)> = vec![
        ("edit", || MessageAction::Edit { text: "changed".into() }),
        ("react", || MessageAction::React { emoji: "x".into() }),
        ("reply", || MessageAction::Reply { text: "re".into() }),
        ("pin", || MessageAction::Pin),
        ("delete", || MessageAction::Delete),
    ];
    // (actor, whose message, action) -> allowed
    let expected = |actor: &str, own: bool, what: &str| -> bool {
        match (actor, what) {
            (_, "edit") => own,
            ("ada", _) => true,
            ("bob", "pin") => false,
            ("bob", "delete") => own,
            ("bob", _) => true,
            _ => unreachable!(),
        }
    };
    let mut n = 0;
    for actor in [&ada, &bob] {
        for author in [&ada, &bob] {
            for (what, make) in &actions {
                n += 1;
                let key = format!("m{n}");
                let outcome = store.append_posts(&[post(lobby.id, author, &key, "target")]).expect("post");
                let target = match &outcome[0] {
                    PostOutcome::Inserted(d) => d.seq,
                    other => panic!("{other:?}"),
                };
                let a = action(lobby.id, target.get(), actor, make(), &format!("a{n}"));
                let own = actor.id == author.id;
                let result = store.act(&a);
                let allowed = expected(&actor.name, own, what);
                match (&result, allowed) {
                    (Ok(ActionOutcome::Applied(_)), true) => {}
                    (Err(StoreError::Forbidden(_)), false) => {}
                    _ => panic!(
                        "{} doing {what} on {}'s message: expected allowed={allowed}, got {result:?}",
                        actor.name, author.name
                    ),
                }
            }
        }
    }
}

fn one_direct_dialog_per_pair(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let carol = user(store, "carol");
    let made = store.open_direct(bob.id, "bob", "ada", T0, MAX_ROOMS).expect("open");
    let created = made.created.expect("a new dialog");
    assert_eq!((made.peer, made.room.kind, made.room.name.as_str()), (ada.id, RoomKind::DIRECT, "ada & bob"));
    assert_eq!((created.seq, created.kind, created.author_id), (Seq(1), RecordKind::CREATE, bob.id));
    // Whichever side asks, the same room, made once.
    let again = store.open_direct(ada.id, "ada", "bob", T0 + 1, MAX_ROOMS).expect("open from the other side");
    assert_eq!((again.room.id, again.created), (made.room.id, None));
    assert!(
        store.is_member(made.room.id, ada.id).expect("member")
            && store.is_member(made.room.id, bob.id).expect("member")
    );
    // Nobody joins it, neither side leaves it.
    let err = store.join_room(made.room.id, carol.id, "carol", T0, MAX_ROOMS).expect_err("join a dialog");
    assert!(matches!(err, StoreError::Forbidden(_)), "{err:?}");
    let err = store.leave_room(made.room.id, ada.id, "ada", T0).expect_err("leave a dialog");
    assert!(matches!(err, StoreError::Forbidden(_)), "{err:?}");
    assert_eq!(store.join_room(made.room.id, ada.id, "ada", T0, MAX_ROOMS).expect("a member joining"), None);
    let other = store.open_direct(carol.id, "carol", "ada", T0, MAX_ROOMS).expect("another pair");
    assert_ne!(other.room.id, made.room.id);
    let err = store.open_direct(ada.id, "ada", "nobody", T0, MAX_ROOMS).expect_err("no such user");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    // Posting works as in any room.
    let out = store.append_posts(&[post(made.room.id, &ada, "k", "hi bob")]).expect("post");
    assert_eq!(inserted(&out[0]).seq, Seq(2));
    // Caps count for both sides.
    let dan = user(store, "dan");
    let err = store.open_direct(dan.id, "dan", "ada", T0, 2).expect_err("ada is in 2 rooms");
    assert!(matches!(err, StoreError::LimitReached(_)), "{err:?}");
}

/// Two connections opening the same dialog at once from both sides get one room.
fn direct_dialogs_race_to_one_room(db: &Db) {
    let mut setup = db.open();
    let ada = user(&mut *setup, "ada");
    let bob = user(&mut *setup, "bob");
    let rooms: Vec<RoomId> = thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let (me, peer) = if i % 2 == 0 { (&ada, "bob") } else { (&bob, "ada") };
                s.spawn(move || {
                    let mut store = db.open();
                    store.open_direct(me.id, &me.name, peer, T0, MAX_ROOMS).expect("open").room.id
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert!(rooms.windows(2).all(|w| w[0] == w[1]), "{rooms:?}");
}

fn moderation(room: RoomId, actor: &UserRecord, target: &str, action: MemberAction) -> NewModeration {
    NewModeration {
        room,
        actor: actor.id,
        actor_name: actor.name.clone(),
        target: target.into(),
        action,
        max_rooms: MAX_ROOMS,
        now_ms: T0 + 60,
    }
}

/// The permission matrix: every role (the four built-in ones and a room-defined one) against
/// every action the store checks, allowed or refused, written out by hand so that a change to a
/// role's set shows up here.
fn every_role_against_every_action(store: &mut dyn Store) {
    const ACTIONS: [&str; 11] = [
        "post",
        "edit_own",
        "delete_own",
        "delete_any",
        "react",
        "pin",
        "invite",
        "kick",
        "ban",
        "mute",
        "manage_roles",
    ];
    #[rustfmt::skip]
    let table: [(&str, [bool; 11]); 5] = [
        //              post   edit   del_o  del_a  react  pin    invite kick   ban    mute   roles
        ("owner",     [true,  true,  true,  true,  true,  true,  true,  true,  true,  true,  true]),
        ("admin",     [true,  true,  true,  true,  true,  true,  true,  true,  true,  true,  true]),
        ("moderator", [true,  true,  true,  true,  true,  true,  true,  true,  false, true,  false]),
        ("member",    [true,  true,  true,  false, true,  false, false, false, false, false, false]),
        ("helper",    [true,  false, false, false, true,  true,  false, false, false, false, false]),
    ];
    let boss = user(store, "boss");
    let mut n = 0;
    for (role, allowed) in table {
        let lobby = room(store, &format!("room-{role}"), &boss);
        let helper = Permissions::READ.with(Permissions::POST).with(Permissions::PIN).with(Permissions::REACT);
        store.define_role(lobby.id, boss.id, "boss", "helper", Some(helper), T0).expect("define helper");
        let actor = if role == "owner" {
            boss.clone()
        } else {
            let actor = user(store, &format!("actor-{role}"));
            store.join_room(lobby.id, actor.id, &actor.name, T0, MAX_ROOMS).expect("join");
            let set = moderation(lobby.id, &boss, &actor.name, MemberAction::SetRole(role.into()));
            if role != "member" {
                store.moderate(&set).expect("give the role");
            }
            actor
        };
        for (i, what) in ACTIONS.iter().enumerate() {
            n += 1;
            let victim = user(store, &format!("victim{n}"));
            store.join_room(lobby.id, victim.id, &victim.name, T0, MAX_ROOMS).expect("victim joins");
            let theirs =
                inserted(&store.append_posts(&[post(lobby.id, &victim, &format!("v{n}"), "theirs")]).expect("post")[0])
                    .seq;
            // The actor's own message, written as the owner would see it allowed: by the store
            // directly when the actor may post, else skipped (edit/delete own need one).
            let own = || post(lobby.id, &actor, &format!("o{n}"), "mine");
            let result: Result<(), String> = match *what {
                "post" => match &store.append_posts(&[own()]).expect("post")[0] {
                    PostOutcome::Inserted(_) => Ok(()),
                    other => Err(format!("{other:?}")),
                },
                "edit_own" | "delete_own" => {
                    let mine = inserted(&store.append_posts(&[own()]).expect("post")[0]).seq;
                    let action = if *what == "edit_own" {
                        MessageAction::Edit { text: "new".into() }
                    } else {
                        MessageAction::Delete
                    };
                    store.act(&action_on(lobby.id, mine, &actor, action)).map(drop).map_err(|e| format!("{e:?}"))
                }
                "delete_any" => store
                    .act(&action_on(lobby.id, theirs, &actor, MessageAction::Delete))
                    .map(drop)
                    .map_err(|e| format!("{e:?}")),
                "react" => store
                    .act(&action_on(lobby.id, theirs, &actor, MessageAction::React { emoji: "x".into() }))
                    .map(drop)
                    .map_err(|e| format!("{e:?}")),
                "pin" => store
                    .act(&action_on(lobby.id, theirs, &actor, MessageAction::Pin))
                    .map(drop)
                    .map_err(|e| format!("{e:?}")),
                "invite" => {
                    let outsider = user(store, &format!("outsider{n}"));
                    store
                        .moderate(&moderation(lobby.id, &actor, &outsider.name, MemberAction::Invite))
                        .map(drop)
                        .map_err(|e| format!("{e:?}"))
                }
                "kick" | "ban" | "mute" => {
                    let action = match *what {
                        "kick" => MemberAction::Kick,
                        "ban" => MemberAction::Ban,
                        _ => MemberAction::Mute,
                    };
                    store
                        .moderate(&moderation(lobby.id, &actor, &victim.name, action))
                        .map(drop)
                        .map_err(|e| format!("{e:?}"))
                }
                "manage_roles" => store
                    .define_role(lobby.id, actor.id, &actor.name, &format!("r{n}"), Some(Permissions::READ), T0)
                    .map(drop)
                    .map_err(|e| format!("{e:?}")),
                other => unreachable!("{other}"),
            };
            match (&result, allowed[i]) {
                (Ok(()), true) => {}
                (Err(e), false) if e.contains("Forbidden") => {}
                _ => panic!("{role} doing {what}: expected allowed={}, got {result:?}", allowed[i]),
            }
        }
    }
}

fn action_on(room: RoomId, target: Seq, who: &UserRecord, action: MessageAction) -> NewAction {
    NewAction {
        room,
        target,
        actor: who.id,
        actor_name: who.name.clone(),
        action,
        idempotency_key: String::new(),
        now_ms: T0 + 50,
    }
}

fn moderation_changes_membership_and_posting(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let eve = user(store, "eve");
    let club =
        store.create_room("club", chime_storage::RoomKind::PRIVATE, ada.id, "ada", T0, MAX_ROOMS).expect("private").0;
    // Invite-only: joining by id is refused; an invite makes a member.
    let err = store.join_room(club.id, bob.id, "bob", T0, MAX_ROOMS).expect_err("uninvited");
    assert!(matches!(err, StoreError::Forbidden(_)), "{err:?}");
    let ModerationOutcome::Applied { delta, user: invited, added: true, removed: false } =
        store.moderate(&moderation(club.id, &ada, "bob", MemberAction::Invite)).expect("invite")
    else {
        panic!("invite changed nothing")
    };
    assert_eq!((delta.kind, delta.body.as_str(), invited), (RecordKind::INVITE, "bob", bob.id));
    assert!(store.is_member(club.id, bob.id).expect("member"));
    assert!(matches!(
        store.moderate(&moderation(club.id, &ada, "bob", MemberAction::Invite)).expect("again"),
        ModerationOutcome::Unchanged { .. }
    ));
    // Muted: cannot post; unmuted: can.
    store.moderate(&moderation(club.id, &ada, "bob", MemberAction::Mute)).expect("mute");
    assert_eq!(store.append_posts(&[post(club.id, &bob, "m1", "hi")]).expect("post")[0], PostOutcome::Forbidden);
    store.moderate(&moderation(club.id, &ada, "bob", MemberAction::Unmute)).expect("unmute");
    assert!(matches!(
        store.append_posts(&[post(club.id, &bob, "m2", "hi")]).expect("post")[0],
        PostOutcome::Inserted(_)
    ));
    // A redefined `member` is the room-wide default: read-only members cannot post.
    store.define_role(club.id, ada.id, "ada", "member", Some(Permissions::READ), T0).expect("read-only room");
    assert_eq!(store.append_posts(&[post(club.id, &bob, "m3", "hi")]).expect("post")[0], PostOutcome::Forbidden);
    store.define_role(club.id, ada.id, "ada", "member", None, T0).expect("back to the built-in set");
    assert!(matches!(
        store.append_posts(&[post(club.id, &bob, "m4", "hi")]).expect("post")[0],
        PostOutcome::Inserted(_)
    ));
    // Banned: removed and kept out until unbanned; a kick lets one back in.
    let ModerationOutcome::Applied { removed: true, .. } =
        store.moderate(&moderation(club.id, &ada, "bob", MemberAction::Ban)).expect("ban")
    else {
        panic!("ban did not remove")
    };
    assert!(!store.is_member(club.id, bob.id).expect("gone"));
    let err =
        store.moderate(&moderation(club.id, &ada, "bob", MemberAction::Invite)).expect_err("invite a banned user");
    assert!(matches!(err, StoreError::Forbidden(_)), "{err:?}");
    let lobby = room(store, "lobby", &ada);
    store.join_room(lobby.id, eve.id, "eve", T0, MAX_ROOMS).expect("join");
    store.moderate(&moderation(lobby.id, &ada, "eve", MemberAction::Ban)).expect("ban eve");
    let err = store.join_room(lobby.id, eve.id, "eve", T0, MAX_ROOMS).expect_err("banned");
    assert!(matches!(err, StoreError::Forbidden(_)), "{err:?}");
    store.moderate(&moderation(lobby.id, &ada, "eve", MemberAction::Unban)).expect("unban");
    store.join_room(lobby.id, eve.id, "eve", T0, MAX_ROOMS).expect("back").expect("a JOIN");
    store.moderate(&moderation(lobby.id, &ada, "eve", MemberAction::Kick)).expect("kick");
    store.join_room(lobby.id, eve.id, "eve", T0, MAX_ROOMS).expect("back after a kick").expect("a JOIN");
    // Roles: unknown ones are refused, the log records the grant.
    let err = store
        .moderate(&moderation(lobby.id, &ada, "eve", MemberAction::SetRole("wizard".into())))
        .expect_err("undefined role");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let ModerationOutcome::Applied { delta, .. } =
        store.moderate(&moderation(lobby.id, &ada, "eve", MemberAction::SetRole("moderator".into()))).expect("promote")
    else {
        panic!()
    };
    assert_eq!(
        (delta.kind, delta.body.as_str(), delta.target),
        (RecordKind::ROLE, "moderator", Some(Seq(eve.id.get())))
    );
    let roles: Vec<(String, String)> =
        store.members(lobby.id, UserId(0), 10).expect("members").into_iter().map(|m| (m.name, m.role)).collect();
    assert!(roles.contains(&("eve".into(), "moderator".into())), "{roles:?}");
    let err =
        store.define_role(lobby.id, ada.id, "ada", "owner", Some(Permissions::READ), T0).expect_err("owner is fixed");
    assert!(matches!(err, StoreError::Forbidden(_)), "{err:?}");
}

fn new_server(owner: &UserRecord, name: &str, public: bool, cap: u64) -> NewServer {
    NewServer {
        owner: owner.id,
        owner_name: owner.name.clone(),
        name: name.into(),
        description: "about".into(),
        public,
        member_cap: cap,
        now_ms: T0,
    }
}

fn channel(server: ServerId, who: &UserRecord, name: &str, read: &[&str], post: &[&str]) -> NewChannel {
    NewChannel {
        server,
        actor: who.id,
        actor_name: who.name.clone(),
        name: name.into(),
        kind: RoomKind::CHANNEL,
        read_roles: read.iter().map(|r| r.to_string()).collect(),
        post_roles: post.iter().map(|r| r.to_string()).collect(),
        now_ms: T0,
    }
}

fn servers_give_access_to_channels_by_role(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let cat = user(store, "cat");
    let (server, general, created) =
        store.create_server(&new_server(&ada, "rustaceans", true, 2), MAX_ROOMS).expect("create");
    assert_eq!((server.members, server.role.as_deref(), server.public), (1, Some("owner"), true));
    assert_eq!((general.name.as_str(), general.kind, created.seq), ("general", RoomKind::CHANNEL, Seq(1)));
    // Joining is one row; the member may read the server's channels, without room_members rows.
    let (joined, channels, fresh) = store.join_server(server.id, bob.id, T0, MAX_ROOMS).expect("join");
    assert!(fresh);
    assert_eq!((joined.members, joined.role.as_deref()), (2, Some("member")));
    assert_eq!(channels.iter().map(|r| r.id).collect::<Vec<_>>(), [general.id]);
    assert!(!store.join_server(server.id, bob.id, T0, MAX_ROOMS).expect("again").2);
    let err = store.join_server(server.id, cat.id, T0, MAX_ROOMS).expect_err("at the cap of 2");
    assert!(matches!(err, StoreError::LimitReached(_)), "{err:?}");
    assert!(store.is_member(general.id, bob.id).expect("member"));
    assert!(!store.is_member(general.id, cat.id).expect("not a member"));
    assert!(matches!(
        store.append_posts(&[post(general.id, &bob, "b1", "hi")]).expect("post")[0],
        PostOutcome::Inserted(_)
    ));
    assert_eq!(store.append_posts(&[post(general.id, &cat, "c1", "hi")]).expect("post")[0], PostOutcome::NotMember);
    let details = store.room_details(general.id, bob.id).expect("details").expect("room");
    assert_eq!((details.members, details.role.as_deref()), (2, Some("member")));
    let listed: Vec<String> =
        store.members(general.id, UserId(0), 10).expect("members").into_iter().map(|m| m.name).collect();
    assert_eq!(listed, ["ada", "bob"]);
    // Channels: only who may manage channels creates them; reading and posting follow roles.
    let err = store.create_channel(&channel(server.id, &bob, "mine", &[], &[])).expect_err("a member");
    assert!(matches!(err, StoreError::Forbidden(_)), "{err:?}");
    let staff = store.create_channel(&channel(server.id, &ada, "staff", &["moderator"], &[])).expect("staff").0;
    let news = store.create_channel(&channel(server.id, &ada, "news", &[], &["moderator"])).expect("news").0;
    assert!(!store.is_member(staff.id, bob.id).expect("hidden"));
    assert_eq!(store.append_posts(&[post(staff.id, &bob, "b2", "hi")]).expect("post")[0], PostOutcome::NotMember);
    let mine: Vec<RoomId> = store.rooms_of_user(bob.id).expect("rooms").into_iter().map(|r| r.id).collect();
    assert_eq!(mine, [general.id, news.id], "a restricted channel is not among a member's rooms");
    assert_eq!(store.append_posts(&[post(news.id, &bob, "b3", "hi")]).expect("post")[0], PostOutcome::Forbidden);
    let page: Vec<RoomId> = store.rooms_page(bob.id, general.id, 10).expect("page").into_iter().map(|r| r.id).collect();
    assert_eq!(page, [news.id]);
    // A moderator reads the staff channel and posts the news; joining or leaving a channel as a
    // room is refused.
    assert!(store.set_server_role(server.id, ada.id, "bob", "moderator").expect("promote"));
    assert!(!store.set_server_role(server.id, ada.id, "bob", "moderator").expect("again"));
    assert!(store.is_member(staff.id, bob.id).expect("now visible"));
    assert!(matches!(
        store.append_posts(&[post(news.id, &bob, "b4", "hi")]).expect("post")[0],
        PostOutcome::Inserted(_)
    ));
    assert!(matches!(store.join_room(general.id, cat.id, "cat", T0, MAX_ROOMS), Err(StoreError::Forbidden(_))));
    assert!(matches!(store.leave_room(general.id, bob.id, "bob", T0), Err(StoreError::Forbidden(_))));
    // Message actions take the server role: a moderator deletes anyone's message.
    let ada_msg = inserted(&store.append_posts(&[post(general.id, &ada, "a1", "x")]).expect("post")[0]).seq;
    let deleted = store.act(&action_on(general.id, ada_msg, &bob, MessageAction::Delete)).expect("delete_any");
    assert!(matches!(deleted, ActionOutcome::Applied(_)), "{deleted:?}");
    store.define_server_role(server.id, ada.id, "member", Some(Permissions::READ)).expect("read-only server");
    let err = store.set_server_role(server.id, bob.id, "ada", "member").expect_err("below the owner");
    assert!(matches!(err, StoreError::Forbidden(_)), "{err:?}");
    // Leaving: the owner cannot; a member can, and loses the channels.
    assert!(matches!(store.leave_server(server.id, ada.id), Err(StoreError::Forbidden(_))));
    let left = store.leave_server(server.id, bob.id).expect("leave");
    assert_eq!(left, [general.id, staff.id, news.id]);
    assert!(!store.is_member(general.id, bob.id).expect("gone"));
    assert_eq!(store.servers_page(ada.id, ServerId(0), 10).expect("servers").len(), 1);
    assert!(store.servers_page(bob.id, ServerId(0), 10).expect("servers").is_empty());
    let private = store.create_server(&new_server(&ada, "secret society", false, 10), MAX_ROOMS).expect("private").0;
    assert!(matches!(store.join_server(private.id, cat.id, T0, MAX_ROOMS), Err(StoreError::Forbidden(_))));
}

fn unread_counts_follow_read_cursors_and_mentions(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let eve = user(store, "eve");
    let lobby = room(store, "lobby", &ada);
    store.join_room(lobby.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    let posts: Vec<NewPost> = (0..5).map(|i| post(lobby.id, &ada, &format!("k{i}"), "hello")).collect();
    store.append_posts(&posts).expect("posts");
    store.append_posts(&[post(lobby.id, &ada, "m", "hi @bob and @eve, @bob again")]).expect("a mention");
    store.append_posts(&[post(lobby.id, &bob, "own", "mine do not count")]).expect("own");
    // Bob: 6 messages by others, one mention (eve is no member: not mentioned); his own and the
    // JOIN do not count.
    let all = store.unread(bob.id, RoomId(0), 10).expect("unread");
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].room, all[0].unread, all[0].mentions, all[0].read), (lobby.id, 6, 1, Seq(0)));
    assert!(store.mentions(eve.id, 10).expect("eve").is_empty());
    let m = store.mentions(bob.id, 10).expect("mentions");
    assert_eq!(
        (m.len(), m[0].author.as_str(), m[0].text.as_deref(), m[0].read),
        (1, "ada", Some("hi @bob and @eve, @bob again"), false)
    );
    // Reading moves forward only and is clamped to the head.
    let after = store.mark_read(lobby.id, bob.id, Seq(5), Seq(5)).expect("read");
    // Seqs 3..=7 are the five posts, 8 the mention, 9 bob's own: after 5, three by others.
    assert_eq!((after.unread, after.mentions, after.read, after.delivered), (3, 1, Seq(5), Seq(5)));
    let back = store.mark_read(lobby.id, bob.id, Seq(2), Seq(2)).expect("read less");
    assert_eq!(back.read, Seq(5), "a cursor never moves back");
    let past = store.mark_read(lobby.id, bob.id, Seq(999), Seq(999)).expect("read past the head");
    assert_eq!((past.read, past.head, past.unread, past.mentions), (past.head, Seq(9), 0, 0));
    assert!(store.unread(bob.id, RoomId(0), 10).expect("unread").is_empty());
    assert!(store.mentions(bob.id, 10).expect("mentions")[0].read);
    assert!(matches!(store.mark_read(lobby.id, eve.id, Seq(1), Seq(1)), Err(StoreError::NotMember(_))));
    // Channels: readers have cursors without member rows.
    let (server, general, _) = store.create_server(&new_server(&ada, "s", true, 10), MAX_ROOMS).expect("server");
    store.join_server(server.id, eve.id, T0, MAX_ROOMS).expect("join");
    store.append_posts(&[post(general.id, &ada, "g", "@eve look")]).expect("post");
    let eve_unread = store.unread(eve.id, RoomId(0), 10).expect("unread");
    assert_eq!(eve_unread.iter().map(|u| (u.room, u.unread, u.mentions)).collect::<Vec<_>>(), [(general.id, 1, 1)]);
}

fn calls_are_signalled_as_deltas(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let lobby = room(store, "lobby", &ada);
    store.join_room(lobby.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    let invite = store.signal(lobby.id, (ada.id, "ada"), RecordKind::CALL_INVITE, Seq(0), "offer", T0).expect("invite");
    assert_eq!(
        (invite.seq, invite.kind, invite.body.as_str(), invite.target),
        (Seq(3), RecordKind::CALL_INVITE, "offer", None)
    );
    let accept =
        store.signal(lobby.id, (bob.id, "bob"), RecordKind::CALL_ACCEPT, invite.seq, "answer", T0).expect("accept");
    assert_eq!(accept.target, Some(invite.seq));
    let err = store.signal(lobby.id, (bob.id, "bob"), RecordKind::CALL_END, Seq(1), "", T0).expect_err("no call at 1");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    store.moderate(&moderation(lobby.id, &ada, "bob", MemberAction::Mute)).expect("mute");
    let err = store.signal(lobby.id, (bob.id, "bob"), RecordKind::CALL_END, invite.seq, "", T0).expect_err("muted");
    assert!(matches!(err, StoreError::Forbidden(_)), "{err:?}");
    let carol = user(store, "carol");
    assert!(matches!(
        store.signal(lobby.id, (carol.id, "carol"), RecordKind::CALL_INVITE, Seq(0), "", T0),
        Err(StoreError::NotMember(_))
    ));
    let kinds: Vec<RecordKind> = log(store, lobby.id).iter().map(|d| d.kind).collect();
    assert_eq!(kinds[2..], [RecordKind::CALL_INVITE, RecordKind::CALL_ACCEPT, RecordKind::MUTE]);
}

/// With a key file, a secret room's text is stored sealed (the bare store sees ciphertext) and read
/// back in clear; a delete destroys the message's key, so the message and its edits read as
/// tombstones while replies (messages of their own) stay; a slot freed by a delete and reused is
/// not destroyed again by a retried delete; other rooms are stored as given.
fn secret_rooms_seal_text_and_deletes_destroy_it(db: &Db) {
    use chime_storage::secret::{KeyFile, SecretKeys};
    let dir = tempfile::tempdir().expect("key dir");
    let keys = KeyFile::open(&dir.path().join("secret-keys")).expect("key file");
    let options = OpenOptions { secret_keys: Some(SecretKeys(keys)), ..OpenOptions::default() };
    let mut keyed = db.open_with(&options);
    let mut bare = db.open();
    let store = &mut *keyed;
    let ada = user(store, "ada");
    let (secret, _) = store.create_room("shh", RoomKind::SECRET, ada.id, "ada", T0, MAX_ROOMS).expect("room");
    let lobby = room(store, "lobby", &ada);
    let out = store.append_posts(&[post(secret.id, &ada, "k", "first words"), post(lobby.id, &ada, "k", "open words")]);
    let out = out.expect("posts");
    assert_eq!((inserted(&out[0]).body.as_str(), inserted(&out[1]).body.as_str()), ("first words", "open words"));
    applied(
        store.act(&action(secret.id, 2, &ada, MessageAction::Edit { text: "second words".into() }, "e")).expect("edit"),
    );
    let reply = applied(
        store
            .act(&action(secret.id, 2, &ada, MessageAction::Reply { text: "reply words".into() }, "r"))
            .expect("reply"),
    );
    assert_eq!(reply.body, "reply words");
    let texts = |s: &mut dyn Store, room: RoomId| log(s, room).into_iter().map(|d| d.body).collect::<Vec<_>>();
    assert_eq!(texts(store, secret.id), ["shh", "first words", "second words", "reply words"]);
    let current = view(store, secret.id, &ada);
    assert_eq!(
        current.iter().map(|m| m.text.as_deref()).collect::<Vec<_>>(),
        [Some("reply words"), Some("second words")]
    );
    // What the database holds: ciphertext, nothing of the text.
    for body in texts(&mut *bare, secret.id).iter().skip(1) {
        assert!(body.starts_with("sealed:") && !body.contains("words"), "{body}");
    }
    assert!(view(&mut *bare, secret.id, &ada).iter().all(|m| !m.text.as_deref().unwrap_or("").contains("words")));
    assert_eq!(texts(&mut *bare, lobby.id)[1], "open words", "other rooms are stored as given");

    applied(store.act(&action(secret.id, 2, &ada, MessageAction::Delete, "")).expect("delete"));
    let log_now = texts(store, secret.id);
    assert_eq!(log_now[..4], ["shh", "", "", "reply words"], "the message and its edit are tombstones");
    let current = view(store, secret.id, &ada);
    assert_eq!(
        current.iter().map(|m| (m.text.as_deref(), m.deleted)).collect::<Vec<_>>(),
        [(Some("reply words"), false), (None, true)]
    );
    // The freed slot goes to the next message; a retried delete of the old one leaves it alone.
    let next = store.append_posts(&[post(secret.id, &ada, "k2", "next words")]).expect("post");
    let next = inserted(&next[0]).seq;
    store.act(&action(secret.id, 2, &ada, MessageAction::Delete, "")).expect("retried delete");
    let log_now = texts(store, secret.id);
    assert_eq!(log_now.last().map(String::as_str), Some("next words"), "{log_now:?}");
    assert_eq!(log_now[1], "", "the old message stays a tombstone under the reused slot");
    assert!(store.deltas_after(secret.id, Seq(next.get() - 1), 1).expect("read")[0].body == "next words");

    // A mention in a secret room is recorded (the names stay beside the ciphertext) and reads in
    // clear in the mentioned user's notifications, until the message is deleted.
    let bob = user(store, "bob");
    let invite = NewModeration {
        room: secret.id,
        actor: ada.id,
        actor_name: "ada".into(),
        target: "bob".into(),
        action: MemberAction::Invite,
        max_rooms: MAX_ROOMS,
        now_ms: T0,
    };
    store.moderate(&invite).expect("invite");
    let out = store.append_posts(&[post(secret.id, &ada, "k3", "psst @bob, the code")]).expect("post");
    let seq = inserted(&out[0]).seq;
    let raw = texts(&mut *bare, secret.id).pop().expect("stored");
    assert!(raw.starts_with("sealed:") && raw.ends_with("\n@bob") && !raw.contains("code"), "{raw}");
    let notes = store.mentions(bob.id, 10).expect("mentions");
    assert_eq!(
        notes.iter().map(|m| (m.seq, m.text.as_deref())).collect::<Vec<_>>(),
        [(seq, Some("psst @bob, the code"))]
    );
    applied(store.act(&action(secret.id, seq.get(), &ada, MessageAction::Delete, "")).expect("delete"));
    assert_eq!(store.mentions(bob.id, 10).expect("mentions")[0].text, None);
}

/// Whom a message notifies: the members it mentions, the other side of a direct dialog (a mention
/// there counts as a mention), never the author, and nobody whose level for the room is none.
fn push_targets_are_mentions_and_direct_peers_who_allow_it(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let cy = user(store, "cy");
    let lobby = room(store, "lobby", &ada);
    store.join_room(lobby.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    store.join_room(lobby.id, cy.id, "cy", T0, MAX_ROOMS).expect("join");
    let out = store
        .append_posts(&[post(lobby.id, &ada, "k1", "@bob @cy @ada hi"), post(lobby.id, &ada, "k2", "nobody")])
        .expect("posts");
    let (mention, plain) = (inserted(&out[0]).seq, inserted(&out[1]).seq);
    let targets = |s: &mut dyn Store, room: RoomId, seq: Seq| {
        s.push_targets(room, seq, ada.id).expect("targets").into_iter().map(|t| (t.name, t.reason)).collect::<Vec<_>>()
    };
    assert_eq!(
        targets(store, lobby.id, mention),
        [("bob".into(), PushReason::Mention), ("cy".into(), PushReason::Mention)]
    );
    assert!(targets(store, lobby.id, plain).is_empty(), "no mention, not a dialog");
    store.set_setting(cy.id, &SettingWrite::Notify { room: lobby.id, level: NotifyLevel::Nothing }).expect("level");
    assert_eq!(targets(store, lobby.id, mention), [("bob".to_string(), PushReason::Mention)]);
    let dm = store.open_direct(ada.id, "ada", "bob", T0, MAX_ROOMS).expect("dm").room.id;
    let out = store.append_posts(&[post(dm, &ada, "d1", "psst"), post(dm, &ada, "d2", "@bob look")]).expect("posts");
    assert_eq!(targets(store, dm, inserted(&out[0]).seq), [("bob".to_string(), PushReason::Direct)]);
    assert_eq!(targets(store, dm, inserted(&out[1]).seq), [("bob".to_string(), PushReason::Mention)]);
}

/// A private server is joined only with an invitation (used up by the join), given by a role that
/// may invite; a ban removes a member, reports the channels they lose, and refuses every join
/// (public servers too) until lifted.
fn private_servers_take_invitations_and_bans_hold(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let cat = user(store, "cat");
    let (private, general, _) = store.create_server(&new_server(&ada, "club", false, 10), MAX_ROOMS).expect("create");
    let forbidden = |r: chime_storage::Result<_>| matches!(r, Err(StoreError::Forbidden(_)));
    assert!(forbidden(store.join_server(private.id, bob.id, T0, MAX_ROOMS).map(drop)));
    let done = store.moderate_server(private.id, ada.id, "bob", &MemberAction::Invite, T0).expect("invite");
    assert_eq!((done.user, done.changed), (bob.id, true));
    assert!(store.join_server(private.id, bob.id, T0, MAX_ROOMS).expect("join").2);
    assert!(!store.moderate_server(private.id, ada.id, "bob", &MemberAction::Invite, T0).expect("again").changed);
    assert!(forbidden(store.moderate_server(private.id, bob.id, "cat", &MemberAction::Invite, T0).map(drop)));
    assert!(forbidden(store.moderate_server(private.id, ada.id, "cat", &MemberAction::Kick, T0).map(drop)));
    let missing = store.moderate_server(private.id, ada.id, "nobody", &MemberAction::Invite, T0);
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
    let banned = store.moderate_server(private.id, ada.id, "bob", &MemberAction::Ban, T0).expect("ban");
    assert_eq!((banned.changed, banned.left_channels), (true, vec![general.id]));
    assert!(!store.is_member(general.id, bob.id).expect("gone"));
    assert!(forbidden(store.moderate_server(private.id, ada.id, "bob", &MemberAction::Invite, T0).map(drop)));
    assert!(forbidden(store.join_server(private.id, bob.id, T0, MAX_ROOMS).map(drop)));
    let (public, _, _) = store.create_server(&new_server(&ada, "plaza", true, 10), MAX_ROOMS).expect("create");
    store.moderate_server(public.id, ada.id, "cat", &MemberAction::Ban, T0).expect("ban ahead");
    assert!(forbidden(store.join_server(public.id, cat.id, T0, MAX_ROOMS).map(drop)));
    store.moderate_server(public.id, ada.id, "cat", &MemberAction::Unban, T0).expect("unban");
    assert!(store.join_server(public.id, cat.id, T0, MAX_ROOMS).expect("join").2);
}

/// A user's last seen is the latest last use of their sessions (touched when connections close);
/// users never seen are left out.
fn last_seen_is_the_latest_use_of_any_session(store: &mut dyn Store) {
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let cat = user(store, "cat");
    let a1 = store.create_session(&new_session(&ada, 1, T0)).expect("a1");
    let a2 = store.create_session(&new_session(&ada, 2, T0 + 10)).expect("a2");
    store.create_session(&new_session(&bob, 3, T0 + 5)).expect("b1");
    store.touch_sessions(&[a1.id], T0 + 500).expect("touch");
    assert_eq!(
        store.last_seen(&[cat.id, bob.id, ada.id, ada.id]).expect("last seen"),
        [(ada.id, T0 + 500), (bob.id, T0 + 5)]
    );
    store.touch_sessions(&[a2.id], T0 + 900).expect("touch");
    assert_eq!(store.last_seen(&[ada.id]).expect("last seen"), [(ada.id, T0 + 900)]);
    assert!(store.last_seen(&[]).expect("none").is_empty());
}

fn files_are_shared_forwarded_and_collected(store: &mut dyn Store) {
    use chime_storage::{NewFile, NewUpload};
    let ada = user(store, "ada");
    let bob = user(store, "bob");
    let lobby = room(store, "lobby", &ada);
    let other = room(store, "other", &ada);
    let sha = [3u8; 32];
    let new_upload = |user: &UserRecord, room: RoomId| NewUpload {
        user: user.id,
        room,
        name: "a.txt".into(),
        size: 5,
        media_type: "text/plain".into(),
        sha256: sha,
        now_ms: T0,
    };
    // Only who may post in the room begins an upload; only its owner finds it again.
    assert!(matches!(store.create_upload(&new_upload(&bob, lobby.id)), Err(StoreError::NotMember(_))));
    let up = store.create_upload(&new_upload(&ada, lobby.id)).expect("upload");
    assert_eq!(store.upload(up.id, ada.id).expect("found"), up);
    // Unfinished uploads per user are capped.
    for _ in 1..chime_storage::files::MAX_OPEN_UPLOADS {
        store.create_upload(&new_upload(&ada, other.id)).expect("under the cap");
    }
    assert!(matches!(store.create_upload(&new_upload(&ada, lobby.id)), Err(StoreError::LimitReached(_))));
    assert!(matches!(store.upload(up.id, bob.id), Err(StoreError::NotFound(_))));

    // Sharing records the file, its permission, a content reference and the delta, and ends the
    // upload.
    let file = NewFile {
        upload: up.id,
        actor: (ada.id, "ada".into()),
        room: lobby.id,
        name: "a.txt".into(),
        size: 5,
        media_type: "text/plain".into(),
        sha256: sha,
        caption: "see\tthis".into(),
        now_ms: T0,
    };
    let (record, delta) = store.share_file(&file).expect("share");
    assert_eq!((delta.kind, delta.seq, delta.target), (RecordKind::FILE_SHARED, Seq(2), Some(Seq(record.id))));
    assert_eq!(
        chime_storage::files::decode_body(&delta.body),
        (sha, 5, "text/plain".into(), "a.txt".into(), "see\tthis".into())
    );
    assert_eq!((record.shared_in, record.internal_name.len()), ((lobby.id, Seq(2)), 64));
    assert!(matches!(store.upload(up.id, ada.id), Err(StoreError::NotFound(_))), "the upload is finished");
    assert!(matches!(store.share_file(&file), Err(StoreError::NotFound(_))), "an upload is shared once");

    // Readers of the room may read the file record; others cannot tell it exists.
    assert_eq!(store.file_for(record.id, ada.id).expect("owner").sha256, sha);
    assert!(matches!(store.file_for(record.id, bob.id), Err(StoreError::NotFound(_))));
    store.join_room(lobby.id, bob.id, "bob", T0, MAX_ROOMS).expect("join");
    assert_eq!(store.file_for(record.id, bob.id).expect("member").id, record.id);

    // A forward is a new record on the same content, readable in the target room.
    assert!(matches!(store.forward((bob.id, "bob"), lobby.id, Seq(2), other.id, T0), Err(StoreError::NotMember(_))));
    let fwd = store.forward((ada.id, "ada"), lobby.id, Seq(2), other.id, T0).expect("forward");
    let copy = fwd.target.expect("a file id").get();
    assert_ne!(copy, record.id);
    assert_eq!(store.file_for(copy, ada.id).expect("copy").shared_in, (other.id, fwd.seq));
    // A shared file counts as unread, like a message.
    let unread = store.unread(bob.id, RoomId(0), 10).expect("unread");
    assert_eq!(unread.iter().find(|u| u.room == lobby.id).map(|u| u.unread), Some(1), "{unread:?}");
    // A plain message forwards as a message.
    store.append_posts(&[post(lobby.id, &ada, "k1", "hello")]).expect("post");
    let msg = store.forward((ada.id, "ada"), lobby.id, Seq(4), other.id, T0).expect("forward text");
    assert_eq!((msg.kind, msg.body.as_str()), (RecordKind::MESSAGE, "hello"));

    // Deleting the original takes its record; the content stays referenced by the copy.
    let del = |room: RoomId, seq: Seq| NewAction {
        room,
        target: seq,
        actor: ada.id,
        actor_name: "ada".into(),
        action: MessageAction::Delete,
        idempotency_key: String::new(),
        now_ms: T0,
    };
    store.act(&del(lobby.id, Seq(2))).expect("delete");
    assert!(matches!(store.file_for(record.id, ada.id), Err(StoreError::NotFound(_))));
    assert!(store.unreferenced_contents(10).expect("list").is_empty());
    assert!(!store.drop_content(&sha).expect("still referenced"));
    // A deleted message cannot be forwarded; a file message cannot be edited.
    assert!(matches!(store.forward((ada.id, "ada"), lobby.id, Seq(2), other.id, T0), Err(StoreError::NotFound(_))));
    let edit = NewAction { action: MessageAction::Edit { text: "x".into() }, ..del(other.id, fwd.seq) };
    assert!(matches!(store.act(&edit), Err(StoreError::Forbidden(_))));
    // The last record gone, the content is unreferenced, and dropped exactly once.
    store.act(&del(other.id, fwd.seq)).expect("delete copy");
    assert_eq!(store.unreferenced_contents(10).expect("list"), vec![sha]);
    assert!(store.drop_content(&sha).expect("drop"));
    assert!(!store.drop_content(&sha).expect("gone"));
    assert!(store.unreferenced_contents(10).expect("list").is_empty());
}
