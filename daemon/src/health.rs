//! Whether the database can be used, and each worker's connection to it, reopened when it fails.
//!
//! A database restart (an unattended PostgreSQL update), a full disk or a locked SQLite file
//! must not need a daemon restart. So every worker holds its store in a [`StoreSlot`]: the first
//! call that fails with [`StoreError::Unavailable`] drops the store, the worker reopens it with
//! exponential backoff (100 ms doubling to 2 s), and the jobs it takes meanwhile are answered at
//! once with a retryable `UNAVAILABLE` instead of waiting on a dead connection.
//!
//! [`Health`] is what the workers know together. It goes down at the first failure of any worker
//! (logged once, with the reason), and the event loop then refuses new store work immediately
//! while keeping every chat connection up. It comes back up only when *every* worker has proven
//! its own connection since (a successful [`chime_storage::Store::ping`]: a committed write on
//! SQLite, `SELECT 1` on PostgreSQL), logged once with how long the outage lasted. Waiting for all
//! of them matters: after a PostgreSQL restart every connection is dead, and a worker that had
//! not noticed yet would otherwise fail its next job and flap the state.
//!
//! Idle workers learn of an outage because they wake up at least every [`IDLE_WAKE`] to call
//! [`StoreSlot::maintain`].

use chime_storage::{
    DeltaRecord, MemberRecord, NewPost, NewSession, OpenOptions, PostOutcome, ProfileRecord, ProfileUpdate,
    RoomDetailsRecord, RoomId, RoomKind, RoomRecord, Seq, SessionId, SessionLimits, SessionRecord, SettingWrite,
    SettingsRecord, SharedStore, Store, StoreError, UserId, UserRecord,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a worker with nothing to do checks on its store.
pub const IDLE_WAKE: Duration = Duration::from_millis(250);

/// First delay before reopening a store that failed; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Kept short: an attempt costs one connection (or file open), and every second of backoff past
/// the database's return is a second of refused requests.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The database's state as the workers see it, shared with the event loop.
#[derive(Debug)]
pub struct Health {
    /// Read by the loop for every request: is the database down?
    down: AtomicBool,
    /// Back up, and the log has not said so yet (so `settle` takes the lock only then).
    settling: AtomicBool,
    /// The outage being tracked, when down.
    state: Mutex<Outage>,
}

#[derive(Debug, Default)]
struct Outage {
    /// When the first failure was seen (`None` while up).
    since: Option<Instant>,
    /// Per worker: has it proven its connection since the outage began?
    proven: Vec<bool>,
    /// Back up at this time, not yet said in the log: a failure before [`SETTLE`] has passed is
    /// the same outage, not a new one (a disk with a little room left serves a ping, then fails
    /// the next batch).
    recovering: Option<Instant>,
}

/// How long the database must stay up after an outage before the log says it is back.
const SETTLE: Duration = Duration::from_secs(2);

impl Health {
    /// A healthy database seen by `workers` workers.
    pub fn new(workers: usize) -> Health {
        let outage = Outage { since: None, proven: vec![false; workers], recovering: None };
        Health { down: AtomicBool::new(false), settling: AtomicBool::new(false), state: Mutex::new(outage) }
    }

    /// Whether the database is down (new store work is refused).
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Outage> {
        // The state is a few flags; a worker that panicked while holding the lock left it usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Worker `worker` could not use the database.
    pub fn failed(&self, worker: usize, reason: &str) {
        let mut outage = self.outage();
        if outage.recovering.take().is_some() {
            // Back for less than `SETTLE`: the same outage goes on, unannounced.
            self.settling.store(false, Ordering::Release);
            outage.proven.iter_mut().for_each(|p| *p = false);
            self.down.store(true, Ordering::Release);
        } else if outage.since.is_none() {
            outage.since = Some(Instant::now());
            outage.proven.iter_mut().for_each(|p| *p = false);
            self.down.store(true, Ordering::Release);
            log::warn!(
                "database unreachable ({reason}); answering UNAVAILABLE and reconnecting until it is back \
                 (chat connections stay up)"
            );
        } else if let Some(p) = outage.proven.get_mut(worker) {
            *p = false;
        }
    }

    /// Worker `worker` proved its connection works. Returns whether this ended the outage.
    pub fn proven(&self, worker: usize) -> bool {
        let mut outage = self.outage();
        let Some(since) = outage.since else { return false };
        if let Some(p) = outage.proven.get_mut(worker) {
            *p = true;
        }
        if !outage.proven.iter().all(|p| *p) {
            return false;
        }
        // Requests are served again now; the log waits until it has stayed up (`settle`).
        let _ = since;
        outage.recovering = Some(Instant::now());
        self.settling.store(true, Ordering::Release);
        self.down.store(false, Ordering::Release);
        true
    }

    /// Says in the log that the database is back once it has stayed up for [`SETTLE`] (called by
    /// the workers between jobs).
    pub fn settle(&self) {
        if !self.settling.load(Ordering::Acquire) || self.is_down() {
            return;
        }
        let mut outage = self.outage();
        let (Some(back), Some(since)) = (outage.recovering, outage.since) else { return };
        if back.elapsed() < SETTLE {
            return;
        }
        log::info!("database reachable again after {:.1} s", back.duration_since(since).as_secs_f64());
        outage.recovering = None;
        outage.since = None;
        self.settling.store(false, Ordering::Release);
    }

    /// Whether worker `worker` still has to prove its connection in the current outage.
    fn must_prove(&self, worker: usize) -> bool {
        let outage = self.outage();
        outage.since.is_some() && outage.recovering.is_none() && !outage.proven.get(worker).copied().unwrap_or(true)
    }
}

/// One worker's store, reopened after it fails.
pub struct StoreSlot {
    /// The worker's index in [`Health`].
    worker: usize,
    /// What to reopen.
    url: String,
    /// How to reopen it.
    options: OpenOptions,
    /// The open store, or `None` while it must be reopened.
    store: Option<Box<dyn Store>>,
    /// The delay before the next reopening attempt.
    backoff: Duration,
    /// No reopening attempt before this.
    next_try: Instant,
    /// Shared state.
    health: std::sync::Arc<Health>,
    /// How many times the store was lost: a job during which this grew may have committed
    /// without knowing it (a connection that died with the COMMIT's answer).
    losses: u64,
}

impl StoreSlot {
    /// A slot holding an already opened store.
    pub fn new(
        worker: usize,
        url: &str,
        options: OpenOptions,
        store: Box<dyn Store>,
        health: std::sync::Arc<Health>,
    ) -> StoreSlot {
        StoreSlot {
            worker,
            url: url.to_string(),
            options,
            store: Some(store),
            backoff: FIRST_BACKOFF,
            next_try: Instant::now(),
            health,
            losses: 0,
        }
    }

    /// How many times the store was lost so far.
    pub fn losses(&self) -> u64 {
        self.losses
    }

    /// Whether the store is open (not being reopened).
    pub fn is_open(&self) -> bool {
        self.store.is_some()
    }

    /// Runs `f` on the store. While the store is being reopened, answers `Unavailable` at once;
    /// an `Unavailable` from `f` drops the store and reports the outage.
    pub fn with<T>(&mut self, f: impl FnOnce(&mut dyn Store) -> chime_storage::Result<T>) -> chime_storage::Result<T> {
        let Some(store) = self.store.as_mut() else {
            return Err(StoreError::Unavailable("the database is being reconnected".into()));
        };
        let result = f(store.as_mut());
        if let Err(StoreError::Unavailable(reason)) = &result {
            self.lost(reason);
        }
        result
    }

    fn lost(&mut self, reason: &str) {
        log::debug!("worker {}: store lost: {reason}", self.worker);
        self.store = None;
        self.losses += 1;
        self.health.failed(self.worker, reason);
        self.backoff = FIRST_BACKOFF;
        self.next_try = Instant::now() + self.backoff;
    }

    /// Between jobs: reopens a lost store when its backoff is over, and during an outage proves
    /// this worker's connection with a ping (so the database is declared back only when every
    /// worker's connection works).
    pub fn maintain(&mut self) {
        if self.store.is_some() && !self.health.is_down() {
            self.health.settle();
            return;
        }
        if self.store.is_none() {
            if Instant::now() < self.next_try {
                return;
            }
            match chime_storage::open_with(&self.url, &self.options) {
                Ok(store) => self.store = Some(store),
                Err(e) => {
                    log::debug!("worker {}: reopening the store failed: {e}", self.worker);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    self.next_try = Instant::now() + self.backoff;
                    return;
                }
            }
        }
        if !self.health.must_prove(self.worker) {
            return;
        }
        let Some(store) = self.store.as_mut() else { return };
        match store.ping() {
            Ok(()) => {
                self.health.proven(self.worker);
            }
            Err(StoreError::Unavailable(reason)) => self.lost(&reason),
            Err(e) => {
                // A database that answers, but with an error: not an outage of the connection.
                log::debug!("worker {}: ping failed: {e}", self.worker);
                self.health.proven(self.worker);
            }
        }
    }

    /// How long the worker may wait for a job before it must call [`StoreSlot::maintain`] again.
    pub fn wait(&self) -> Duration {
        if self.store.is_none() {
            self.next_try.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(10), IDLE_WAKE)
        } else {
            IDLE_WAKE
        }
    }
}

/// The slot is a store: each call goes through [`StoreSlot::with`], so job code needs no idea of
/// reconnection; while the store is being reopened, every call fails `Unavailable` at once.
impl SharedStore for StoreSlot {
    fn create_user(&mut self, name: &str, password_hash: &str) -> chime_storage::Result<UserRecord> {
        self.with(|s| s.create_user(name, password_hash))
    }
    fn user_by_name(&mut self, name: &str) -> chime_storage::Result<Option<UserRecord>> {
        self.with(|s| s.user_by_name(name))
    }
    fn create_session(&mut self, session: &NewSession) -> chime_storage::Result<SessionRecord> {
        self.with(|s| s.create_session(session))
    }
    fn session_user(
        &mut self,
        token_hash: &[u8; 32],
        now_ms: i64,
        limits: &SessionLimits,
    ) -> chime_storage::Result<Option<(UserRecord, SessionRecord)>> {
        self.with(|s| s.session_user(token_hash, now_ms, limits))
    }
    fn list_sessions(
        &mut self,
        user: UserId,
        now_ms: i64,
        limits: &SessionLimits,
    ) -> chime_storage::Result<Vec<SessionRecord>> {
        self.with(|s| s.list_sessions(user, now_ms, limits))
    }
    fn revoke_sessions(
        &mut self,
        user: UserId,
        which: Option<SessionId>,
        now_ms: i64,
    ) -> chime_storage::Result<Vec<SessionId>> {
        self.with(|s| s.revoke_sessions(user, which, now_ms))
    }
    fn touch_sessions(&mut self, sessions: &[SessionId], now_ms: i64) -> chime_storage::Result<()> {
        self.with(|s| s.touch_sessions(sessions, now_ms))
    }
    fn profile(&mut self, user: UserId) -> chime_storage::Result<Option<ProfileRecord>> {
        self.with(|s| s.profile(user))
    }
    fn profile_by_name(&mut self, name: &str) -> chime_storage::Result<Option<ProfileRecord>> {
        self.with(|s| s.profile_by_name(name))
    }
    fn update_profile(&mut self, user: UserId, update: &ProfileUpdate) -> chime_storage::Result<ProfileRecord> {
        self.with(|s| s.update_profile(user, update))
    }
    fn set_setting(&mut self, user: UserId, setting: &SettingWrite<'_>) -> chime_storage::Result<u64> {
        self.with(|s| s.set_setting(user, setting))
    }
    fn settings(&mut self, user: UserId, after_room: RoomId, limit: u32) -> chime_storage::Result<SettingsRecord> {
        self.with(|s| s.settings(user, after_room, limit))
    }
    fn create_room(
        &mut self,
        name: &str,
        kind: RoomKind,
        owner: UserId,
        owner_name: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> chime_storage::Result<(RoomRecord, DeltaRecord)> {
        self.with(|s| s.create_room(name, kind, owner, owner_name, now_ms, max_rooms))
    }
    fn room(&mut self, room: RoomId) -> chime_storage::Result<Option<RoomRecord>> {
        self.with(|s| s.room(room))
    }

    fn rooms_of_user(&mut self, user: UserId) -> chime_storage::Result<Vec<RoomRecord>> {
        self.with(|s| s.rooms_of_user(user))
    }
    fn rooms_page(&mut self, user: UserId, after_room: RoomId, limit: u32) -> chime_storage::Result<Vec<RoomRecord>> {
        self.with(|s| s.rooms_page(user, after_room, limit))
    }
    fn is_member(&mut self, room: RoomId, user: UserId) -> chime_storage::Result<bool> {
        self.with(|s| s.is_member(room, user))
    }
    fn room_details(&mut self, room: RoomId, user: UserId) -> chime_storage::Result<Option<RoomDetailsRecord>> {
        self.with(|s| s.room_details(room, user))
    }
    fn members(&mut self, room: RoomId, after_user: UserId, limit: u32) -> chime_storage::Result<Vec<MemberRecord>> {
        self.with(|s| s.members(room, after_user, limit))
    }

    fn create_server(
        &mut self,
        server: &chime_storage::NewServer,
        max_servers: u64,
    ) -> chime_storage::Result<(chime_storage::ServerRecord, RoomRecord, DeltaRecord)> {
        self.with(|s| s.create_server(server, max_servers))
    }
    fn join_server(
        &mut self,
        server: chime_storage::ServerId,
        user: UserId,
        now_ms: i64,
        max_servers: u64,
    ) -> chime_storage::Result<(chime_storage::ServerRecord, Vec<RoomRecord>, bool)> {
        self.with(|s| s.join_server(server, user, now_ms, max_servers))
    }
    fn leave_server(&mut self, server: chime_storage::ServerId, user: UserId) -> chime_storage::Result<Vec<RoomId>> {
        self.with(|s| s.leave_server(server, user))
    }
    fn servers_page(
        &mut self,
        user: UserId,
        after: chime_storage::ServerId,
        limit: u32,
    ) -> chime_storage::Result<Vec<chime_storage::ServerRecord>> {
        self.with(|s| s.servers_page(user, after, limit))
    }
    fn create_channel(&mut self, c: &chime_storage::NewChannel) -> chime_storage::Result<(RoomRecord, DeltaRecord)> {
        self.with(|s| s.create_channel(c))
    }
    fn set_server_role(
        &mut self,
        server: chime_storage::ServerId,
        actor: UserId,
        target: &str,
        role: &str,
    ) -> chime_storage::Result<bool> {
        self.with(|s| s.set_server_role(server, actor, target, role))
    }
    fn define_server_role(
        &mut self,
        server: chime_storage::ServerId,
        actor: UserId,
        name: &str,
        perms: Option<chime_storage::Permissions>,
    ) -> chime_storage::Result<()> {
        self.with(|s| s.define_server_role(server, actor, name, perms))
    }
    fn open_direct(
        &mut self,
        user: UserId,
        user_name: &str,
        peer: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> chime_storage::Result<chime_storage::DirectRoom> {
        self.with(|s| s.open_direct(user, user_name, peer, now_ms, max_rooms))
    }
    fn mark_read(
        &mut self,
        room: RoomId,
        user: UserId,
        delivered: Seq,
        read: Seq,
    ) -> chime_storage::Result<chime_storage::UnreadRecord> {
        self.with(|s| s.mark_read(room, user, delivered, read))
    }
    fn unread(
        &mut self,
        user: UserId,
        after: RoomId,
        limit: u32,
    ) -> chime_storage::Result<Vec<chime_storage::UnreadRecord>> {
        self.with(|s| s.unread(user, after, limit))
    }
    fn mentions(&mut self, user: UserId, limit: u32) -> chime_storage::Result<Vec<chime_storage::MentionRecord>> {
        self.with(|s| s.mentions(user, limit))
    }
    fn deltas_after(&mut self, room: RoomId, after: Seq, limit: u32) -> chime_storage::Result<Vec<DeltaRecord>> {
        self.with(|s| s.deltas_after(room, after, limit))
    }
    fn messages_before(
        &mut self,
        room: RoomId,
        user: UserId,
        before: Seq,
        limit: u32,
    ) -> chime_storage::Result<Vec<chime_storage::MessageRecord>> {
        self.with(|s| s.messages_before(room, user, before, limit))
    }
    fn deltas_page(
        &mut self,
        room: RoomId,
        order: chime_storage::Order,
        cursor: Seq,
        limit: u32,
    ) -> chime_storage::Result<Vec<DeltaRecord>> {
        self.with(|s| s.deltas_page(room, order, cursor, limit))
    }
    fn partitions(&mut self, room: RoomId) -> chime_storage::Result<Vec<chime_storage::PartitionRecord>> {
        self.with(|s| s.partitions(room))
    }
    fn search(
        &mut self,
        room: RoomId,
        user: UserId,
        words: &[String],
        before: Seq,
        limit: u32,
    ) -> chime_storage::Result<Vec<chime_storage::MessageRecord>> {
        self.with(|s| s.search(room, user, words, before, limit))
    }
    fn ping(&mut self) -> chime_storage::Result<()> {
        self.with(|s| s.ping())
    }
    fn checkpoint(&mut self) -> chime_storage::Result<()> {
        self.with(|s| s.checkpoint())
    }
    fn push_targets(
        &mut self,
        room: RoomId,
        seq: Seq,
        author: UserId,
    ) -> chime_storage::Result<Vec<chime_storage::PushTarget>> {
        self.with(|s| s.push_targets(room, seq, author))
    }
    fn moderate_server(
        &mut self,
        server: chime_storage::ServerId,
        actor: UserId,
        target: &str,
        action: &chime_storage::MemberAction,
        now_ms: i64,
    ) -> chime_storage::Result<chime_storage::ServerModerated> {
        self.with(|s| s.moderate_server(server, actor, target, action, now_ms))
    }
    fn last_seen(&mut self, users: &[UserId]) -> chime_storage::Result<Vec<(UserId, i64)>> {
        self.with(|s| s.last_seen(users))
    }

    fn create_upload(&mut self, u: &chime_storage::NewUpload) -> chime_storage::Result<chime_storage::UploadRecord> {
        self.with(|s| s.create_upload(u))
    }
    fn upload(&mut self, id: u64, user: UserId) -> chime_storage::Result<chime_storage::UploadRecord> {
        self.with(|s| s.upload(id, user))
    }
    fn file_for(&mut self, file: u64, user: UserId) -> chime_storage::Result<chime_storage::FileRecord> {
        self.with(|s| s.file_for(file, user))
    }
    fn drop_content(&mut self, sha256: &[u8; 32]) -> chime_storage::Result<bool> {
        self.with(|s| s.drop_content(sha256))
    }
    fn unreferenced_contents(&mut self, limit: u32) -> chime_storage::Result<Vec<[u8; 32]>> {
        self.with(|s| s.unreferenced_contents(limit))
    }
}

impl Store for StoreSlot {
    fn join_room(
        &mut self,
        room: RoomId,
        user: UserId,
        user_name: &str,
        now_ms: i64,
        max_rooms: u64,
    ) -> chime_storage::Result<Option<DeltaRecord>> {
        self.with(|s| s.join_room(room, user, user_name, now_ms, max_rooms))
    }

    fn leave_room(
        &mut self,
        room: RoomId,
        user: UserId,
        user_name: &str,
        now_ms: i64,
    ) -> chime_storage::Result<DeltaRecord> {
        self.with(|s| s.leave_room(room, user, user_name, now_ms))
    }

    fn append_posts(&mut self, posts: &[NewPost]) -> chime_storage::Result<Vec<PostOutcome>> {
        self.with(|s| s.append_posts(posts))
    }
    fn act(&mut self, action: &chime_storage::NewAction) -> chime_storage::Result<chime_storage::ActionOutcome> {
        self.with(|s| s.act(action))
    }
    fn moderate(
        &mut self,
        m: &chime_storage::NewModeration,
    ) -> chime_storage::Result<chime_storage::ModerationOutcome> {
        self.with(|s| s.moderate(m))
    }
    fn signal(
        &mut self,
        room: RoomId,
        actor: (UserId, &str),
        kind: chime_storage::RecordKind,
        call: Seq,
        data: &str,
        now_ms: i64,
    ) -> chime_storage::Result<DeltaRecord> {
        self.with(|s| s.signal(room, actor, kind, call, data, now_ms))
    }
    fn define_role(
        &mut self,
        room: RoomId,
        actor: UserId,
        actor_name: &str,
        name: &str,
        perms: Option<chime_storage::Permissions>,
        now_ms: i64,
    ) -> chime_storage::Result<DeltaRecord> {
        self.with(|s| s.define_role(room, actor, actor_name, name, perms, now_ms))
    }
    fn share_file(
        &mut self,
        f: &chime_storage::NewFile,
    ) -> chime_storage::Result<(chime_storage::FileRecord, DeltaRecord)> {
        self.with(|s| s.share_file(f))
    }
    fn forward(
        &mut self,
        actor: (UserId, &str),
        room: RoomId,
        seq: Seq,
        to_room: RoomId,
        now_ms: i64,
    ) -> chime_storage::Result<DeltaRecord> {
        self.with(|s| s.forward(actor, room, seq, to_room, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_at_the_first_failure_up_when_every_worker_proved_itself() {
        let h = Health::new(3);
        assert!(!h.is_down());
        assert!(!h.proven(0), "nothing to end while up");
        h.failed(1, "connection reset");
        assert!(h.is_down());
        assert!(!h.proven(0));
        assert!(!h.proven(1));
        // A worker failing again takes its proof back.
        h.failed(1, "still down");
        assert!(!h.proven(2));
        assert!(h.is_down(), "worker 1 has not proven itself since its last failure");
        assert!(h.proven(1), "the last proof ends the outage");
        assert!(!h.is_down());
        // Failing again before it settled: the same outage, needing every worker again.
        h.failed(0, "disk full");
        assert!(h.is_down());
        assert!(!h.proven(0) && !h.proven(1));
        assert!(h.proven(2));
        assert!(!h.is_down());
    }

    #[test]
    fn a_slot_answers_unavailable_while_reopening_and_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("h.db").display());
        let health = std::sync::Arc::new(Health::new(1));
        let store = chime_storage::open(&url).expect("open");
        let mut slot = StoreSlot::new(0, &url, OpenOptions::default(), store, health.clone());
        slot.with(|s| s.ping()).expect("healthy");
        let err = slot.with(|_| Err::<(), _>(StoreError::Unavailable("simulated".into()))).expect_err("fails");
        assert!(err.is_unavailable());
        assert!(health.is_down());
        let err = slot.with(|s| s.ping()).expect_err("no store while reopening");
        assert!(err.is_unavailable());
        let deadline = Instant::now() + Duration::from_secs(5);
        while health.is_down() {
            assert!(Instant::now() < deadline, "not back within 5 s");
            std::thread::sleep(slot.wait());
            slot.maintain();
        }
        slot.with(|s| s.ping()).expect("back");
    }
}
