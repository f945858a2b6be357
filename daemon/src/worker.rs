//! The database worker pool: every piece of work that touches the store runs here, never on the
//! event loop.
//!
//! Threads and queues:
//! - `workers` **shard workers**, each owning one store connection. Everything that writes to an
//!   existing room ([`Work::Room`], [`Work::Post`]) goes to the shard `room % workers`, so one
//!   room's deltas are committed and published by one thread in seq order. Reads and account work
//!   ([`Work::Shared`]) go to a queue that every shard worker also serves, with a
//!   [`SharedStore`] that cannot append to a room.
//! - `auth_workers` **auth workers** for register and login ([`Work::Auth`]): argon2id takes
//!   tens of milliseconds on purpose, and must not sit in front of anyone's post.
//! - A **housekeeping** thread (embedded store only) checkpoints the WAL, so no commit does.
//! - [`FILE_THREADS`] **file threads** ([`Work::File`]): upload chunk writes, hashing, fsyncs and
//!   download reads, each on its own bounded queue; a job's `order` key picks the thread, so one
//!   upload's chunks are written in the order they arrived.
//!
//! Group commit: a shard worker that takes a post drains every job already waiting in its queue
//! (up to `max_batch`), and commits the consecutive posts among them in one transaction
//! (`handlers::messages::commit`), so a burst of N posts costs one fsync instead of N. Jobs keep
//! their queue order, so a join followed by a post from the same connection is applied in that
//! order.
//!
//! Results go back to the loop over one channel as [`Completion`]s (the effects of one batch),
//! followed by one wake of the loop's `mio::Waker` per batch. Reply frames and published deltas
//! are encoded here, off the loop thread.

use crate::auth;
use crate::handlers::messages;
use crate::health::{Health, StoreSlot};
use crate::work::{Completion, Effect, PostWork, Published, Settings, Work};
use chime_storage::{OpenOptions, RoomId, Seq, SharedStore, Store};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How the pool is set up.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Database worker threads (posts are sharded over them by room).
    pub workers: usize,
    /// Password-hashing threads.
    pub auth_workers: usize,
    /// Most posts committed in one transaction.
    pub max_batch: usize,
    /// How long an embedded-store write waits for a lock.
    pub busy_timeout: Duration,
    /// Deltas per partition of each new room's log.
    pub partition_size: u64,
    /// What the jobs need to know.
    pub settings: Settings,
    /// The key file of secret rooms (chime_storage::secret), in the data directory; `None`: secret
    /// rooms' text is stored unsealed (tests of the pool alone).
    pub secret_keys: Option<std::path::PathBuf>,
}

/// What a worker thread takes from its queue.
enum Msg {
    /// A job.
    Work(Work),
    /// Finish what was queued before this, then exit.
    Stop,
}

/// The loop's end of the pool.
pub struct Pool {
    shards: Vec<Sender<Msg>>,
    /// The file threads' queues (none without a content store).
    files: Vec<Sender<Msg>>,
    file_threads: Vec<JoinHandle<()>>,
    shared: Sender<Msg>,
    auth: Sender<Msg>,
    threads: Vec<JoinHandle<()>>,
    /// Whether the database is usable, as the workers see it.
    health: Arc<Health>,
    /// Stops the housekeeping thread (dropped at shutdown).
    housekeeping: Option<(Sender<()>, JoinHandle<()>)>,
}

/// Why a job could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The queue is full: answer OVERLOADED, the client retries.
    Full,
    /// The pool is stopping.
    Stopped,
}

/// Queue bounds: enough to absorb bursts (a connection has at most 256 requests in flight), small
/// enough that a stalled database shows up as OVERLOADED replies rather than unbounded memory.
/// crossbeam's bounded channels allocate and touch every slot up front, so this is also resident
/// memory: about 3 MiB per queue.
const SHARD_QUEUE: usize = 16_384;
const AUTH_QUEUE: usize = 1_024;
/// Per file thread: each job holds at most one chunk (64 KiB), so a full queue is 16 MiB.
const FILE_QUEUE: usize = 256;
/// File threads: file I/O is mostly page-cache copies and SHA-256, a core's worth each.
pub const FILE_THREADS: usize = 2;

/// How often the housekeeping thread checkpoints the embedded store's WAL.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// How the pool reports back.
pub struct Notify {
    /// Where completions go.
    pub completions: Sender<Completion>,
    /// Wakes the loop once per batch of completions.
    pub waker: Arc<mio::Waker>,
}

impl Notify {
    fn send(&self, effects: Vec<Effect>) {
        if effects.is_empty() {
            return;
        }
        // The loop holds the receiver until every worker has exited; a failed send means it is
        // gone and nobody is waiting for the result.
        if self.completions.send(Completion(effects)).is_ok() {
            if let Err(e) = self.waker.wake() {
                log::error!("waking the event loop failed: {e}");
            }
        }
    }
}

impl Pool {
    /// Opens one store per thread and starts the threads. Fails if any store cannot be opened
    /// (at start-up an unreachable database is a configuration error; later, an outage).
    pub fn start(database_url: &str, config: PoolConfig, notify: Notify) -> anyhow::Result<Pool> {
        let notify = Arc::new(notify);
        let settings = Arc::new(config.settings.clone());
        let health = Arc::new(Health::new(config.workers + config.auth_workers));
        let embedded = !database_url.starts_with("postgres://") && !database_url.starts_with("postgresql://");
        // Workers never checkpoint the embedded store's WAL inside a commit: the housekeeping
        // thread below does, so a commit's latency is its own fsync and nothing else.
        let options = OpenOptions {
            busy_timeout: config.busy_timeout,
            manual_checkpoints: embedded,
            partition_size: config.partition_size,
            secret_keys: match &config.secret_keys {
                Some(path) => Some(chime_storage::secret::SecretKeys(chime_storage::secret::KeyFile::open(path)?)),
                None => None,
            },
            ..OpenOptions::default()
        };
        let (shared_tx, shared_rx) = crossbeam_channel::bounded::<Msg>(SHARD_QUEUE);
        let (auth_tx, auth_rx) = crossbeam_channel::bounded::<Msg>(AUTH_QUEUE);
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        for i in 0..config.workers {
            let store = chime_storage::open_with(database_url, &options)?;
            let slot = StoreSlot::new(i, database_url, options.clone(), store, health.clone());
            let (tx, rx) = crossbeam_channel::bounded::<Msg>(SHARD_QUEUE);
            shards.push(tx);
            let shared_rx = shared_rx.clone();
            let (notify, settings, max_batch) = (notify.clone(), settings.clone(), config.max_batch);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("chimed-db-{i}"))
                    .spawn(move || shard_main(slot, &rx, &shared_rx, max_batch, &settings, &notify))?,
            );
        }
        for i in 0..config.auth_workers {
            let store = chime_storage::open_with(database_url, &options)?;
            let slot = StoreSlot::new(config.workers + i, database_url, options.clone(), store, health.clone());
            let rx = auth_rx.clone();
            let (notify, settings) = (notify.clone(), settings.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("chimed-auth-{i}"))
                    .spawn(move || auth_main(slot, &rx, &settings, &notify))?,
            );
        }
        let housekeeping = if embedded {
            let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
            let url = database_url.to_string();
            let busy_timeout = config.busy_timeout;
            let thread = std::thread::Builder::new()
                .name("chimed-housekeeping".into())
                .spawn(move || housekeeping_main(&url, busy_timeout, &stop_rx))?;
            Some((stop_tx, thread))
        } else {
            None
        };
        let mut files = Vec::new();
        let mut file_threads = Vec::new();
        if let Some(content) = &config.settings.content {
            for i in 0..FILE_THREADS {
                let (tx, rx) = crossbeam_channel::bounded::<Msg>(FILE_QUEUE);
                files.push(tx);
                let (notify, content) = (notify.clone(), content.0.clone());
                file_threads.push(
                    std::thread::Builder::new()
                        .name(format!("chimed-file-{i}"))
                        .spawn(move || file_main(crate::handlers::files::FileThread::new(content), &rx, &notify))?,
                );
            }
        }
        Ok(Pool { shards, files, file_threads, shared: shared_tx, auth: auth_tx, threads, health, housekeeping })
    }

    /// Whether the database is usable; while it is down the loop refuses new store work.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Queues a job on its queue without blocking. The queue follows from the job's type: a room
    /// write cannot reach another thread than its room's shard.
    pub fn submit(&self, work: Work) -> Result<(), Busy> {
        let queue = match &work {
            Work::Room(w) => self.shard(w.room()),
            Work::Post(p) => self.shard(p.post.room),
            Work::Shared(_) => &self.shared,
            Work::Auth(_) => &self.auth,
            Work::File(f) => match self.files.get((f.order % self.files.len().max(1) as u64) as usize) {
                Some(q) => q,
                None => return Err(Busy::Stopped),
            },
        };
        match queue.try_send(Msg::Work(work)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Busy::Full),
            Err(TrySendError::Disconnected(_)) => Err(Busy::Stopped),
        }
    }

    fn shard(&self, room: RoomId) -> &Sender<Msg> {
        &self.shards[(room.get() % self.shards.len() as u64) as usize]
    }

    /// Lets every worker finish what is queued, then stops it and waits for it to exit.
    pub fn shutdown(self) {
        let Pool { shards, files, file_threads, shared, auth, threads, health: _, housekeeping } = self;
        for tx in &files {
            let _ = tx.send(Msg::Stop);
        }
        drop(files);
        for t in file_threads {
            if t.join().is_err() {
                log::error!("a file thread panicked");
            }
        }
        if let Some((stop, thread)) = housekeeping {
            drop(stop);
            if thread.join().is_err() {
                log::error!("the housekeeping thread panicked");
            }
        }
        // An explicit stop behind the queued jobs rather than relying on disconnection alone:
        // a worker parked in a select must wake up for it whatever else it listens to.
        for tx in &shards {
            let _ = tx.send(Msg::Stop);
        }
        let auth_threads = threads.len() - shards.len();
        for _ in 0..auth_threads {
            let _ = auth.send(Msg::Stop);
        }
        drop((shards, shared, auth));
        for t in threads {
            if t.join().is_err() {
                log::error!("a database worker panicked");
            }
        }
    }
}

/// What a shard worker published for its rooms, to repair writes whose outcome it could not know.
///
/// A write to a room can commit while the worker hears only an error: the database connection
/// dies between the COMMIT and its answer. The client retries with the same key and is told
/// "duplicate", so nothing would ever publish that delta, and every live subscriber would miss it
/// (a gap that only its next SYNC repairs). The shard is the only writer of its rooms, so it knows
/// the last seq it published for each; after a job that lost the store, its rooms are *uncertain*,
/// and before anything else touches them (or as soon as the store is back) the worker publishes
/// whatever the log has past that seq.
#[derive(Debug, Default)]
struct Ledger {
    /// The last seq published per room this worker wrote to.
    published: HashMap<RoomId, Seq>,
    /// Rooms with a write of unknown outcome.
    uncertain: BTreeSet<RoomId>,
}

/// Rooms the ledger remembers at most; past it, it forgets them all and reads heads again.
const LEDGER_ROOMS: usize = 100_000;

impl Ledger {
    /// Before writing to `room`: the last published seq is known (read once), and an uncertain
    /// earlier write is published first.
    fn prepare(&mut self, store: &mut StoreSlot, room: RoomId, out: &mut Vec<Effect>) {
        if self.uncertain.contains(&room) {
            self.repair(store, room, out);
        }
        if !self.published.contains_key(&room) {
            if self.published.len() >= LEDGER_ROOMS && self.uncertain.is_empty() {
                self.published.clear();
            }
            if let Ok(Some(record)) = store.room(room) {
                self.published.insert(room, record.last_seq);
            }
        }
    }

    /// Publishes what the log of `room` has past the last seq this worker published.
    fn repair(&mut self, store: &mut StoreSlot, room: RoomId, out: &mut Vec<Effect>) {
        let Some(&from) = self.published.get(&room) else {
            self.uncertain.remove(&room);
            return;
        };
        let mut after = from;
        loop {
            match store.deltas_after(room, after, 500) {
                Ok(deltas) => {
                    let full = deltas.len() == 500;
                    let deltas: Vec<_> = deltas.into_iter().map(crate::work::wire_delta).collect();
                    if let Some(p) = Published::encode(room, &deltas) {
                        after = p.last_seq();
                        out.push(Effect::Publish(p));
                    }
                    if !full {
                        break;
                    }
                }
                // Still away: try again later.
                Err(_) => return,
            }
        }
        if after > from {
            log::info!(
                "room {room}: published seqs {}..={after}, committed while the database connection was lost",
                from.next()
            );
        }
        self.published.insert(room, after);
        self.uncertain.remove(&room);
    }

    /// After a job on `rooms`: note what it published, and whether its outcome may be unknown.
    fn record(&mut self, rooms: &[RoomId], lost: bool, effects: &[Effect]) {
        for e in effects {
            if let Effect::Publish(p) = e {
                let seq = self.published.entry(p.room).or_insert(Seq::ZERO);
                *seq = (*seq).max(p.last_seq());
            }
        }
        if lost {
            self.uncertain.extend(rooms.iter().copied());
        }
    }

    /// Once the store is back: repairs every uncertain room.
    fn repair_all(&mut self, store: &mut StoreSlot, out: &mut Vec<Effect>) {
        if !store.is_open() {
            return;
        }
        let rooms: Vec<RoomId> = self.uncertain.iter().copied().collect();
        for room in rooms {
            self.repair(store, room, out);
        }
    }
}

/// Runs one job that is not a post, and gives its slot back.
fn run(work: Work, store: &mut StoreSlot, settings: &Settings, out: &mut Vec<Effect>) {
    let (to, shared) = (work.reply_to(), work.is_shared());
    match work {
        Work::Room(w) => out.extend(w.run(store, settings)),
        Work::Shared(w) => out.extend(w.run(store as &mut dyn SharedStore, settings)),
        // Posts are committed in groups by the caller; auth jobs never reach a shard.
        Work::Post(p) => out.extend(messages::commit(store, vec![p], settings)),
        Work::Auth(_) => log::error!("a password job reached a shard worker; dropped"),
        Work::File(_) => log::error!("a file job reached a shard worker; dropped"),
    }
    out.extend(to.map(|to| Effect::Release { to, shared }));
}

/// Commits posts together and gives their slots back.
fn commit(store: &mut dyn Store, posts: Vec<PostWork>, settings: &Settings, out: &mut Vec<Effect>) {
    let tos: Vec<_> = posts.iter().map(|p| p.to).collect();
    out.extend(messages::commit(store, posts, settings));
    out.extend(tos.into_iter().map(|to| Effect::Release { to, shared: false }));
}

/// A file thread: runs its jobs in queue order and reports each one's effects and release.
fn file_main(mut thread: crate::handlers::files::FileThread, rx: &Receiver<Msg>, notify: &Notify) {
    while let Ok(Msg::Work(work)) = rx.recv() {
        let Work::File(f) = work else {
            log::error!("a store job reached a file thread; dropped");
            continue;
        };
        let (to, chunk) = (f.job.reply_to(), f.chunk);
        let mut out = f.job.run(&mut thread);
        out.extend(to.map(|to| Effect::FileReleased { to, chunk }));
        notify.send(out);
    }
}

fn shard_main(
    mut slot: StoreSlot,
    own: &Receiver<Msg>,
    shared: &Receiver<Msg>,
    max_batch: usize,
    settings: &Settings,
    notify: &Notify,
) {
    let mut batch: Vec<Work> = Vec::with_capacity(max_batch);
    let mut ledger = Ledger::default();
    loop {
        slot.maintain();
        if !ledger.uncertain.is_empty() {
            let mut out = Vec::new();
            ledger.repair_all(&mut slot, &mut out);
            notify.send(out);
        }
        // Own (write) jobs first: they are what clients wait on for acks. Waiting is bounded so
        // that an idle worker still looks after its store (see `health`).
        let first = match own.try_recv() {
            Ok(m) => m,
            Err(_) => crossbeam_channel::select! {
                recv(own) -> m => match m { Ok(m) => m, Err(_) => return },
                recv(shared) -> m => match m { Ok(m) => m, Err(_) => match own.recv() { Ok(m) => m, Err(_) => return } },
                default(slot.wait()) => continue,
            },
        };
        let Msg::Work(first) = first else { return };
        let mut stop = false;
        batch.clear();
        let grouping = matches!(first, Work::Post(_));
        batch.push(first);
        while grouping && batch.len() < max_batch {
            match own.try_recv() {
                Ok(Msg::Work(w)) => batch.push(w),
                Ok(Msg::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let mut out = Vec::new();
        let mut posts: Vec<PostWork> = Vec::new();
        for work in batch.drain(..) {
            match work {
                Work::Post(p) => posts.push(p),
                other => {
                    commit_group(&mut slot, &mut ledger, std::mem::take(&mut posts), settings, &mut out);
                    let room = match &other {
                        Work::Room(w) => Some(w.room()),
                        _ => None,
                    };
                    if let Some(room) = room {
                        ledger.prepare(&mut slot, room, &mut out);
                    }
                    let (losses, from) = (slot.losses(), out.len());
                    run(other, &mut slot, settings, &mut out);
                    if let Some(room) = room {
                        ledger.record(&[room], slot.losses() != losses, &out[from..]);
                    }
                }
            }
        }
        commit_group(&mut slot, &mut ledger, posts, settings, &mut out);
        notify.send(out);
        if stop {
            return;
        }
    }
}

/// Commits a group of posts, keeping the ledger of what their rooms published.
fn commit_group(
    store: &mut StoreSlot,
    ledger: &mut Ledger,
    posts: Vec<PostWork>,
    settings: &Settings,
    out: &mut Vec<Effect>,
) {
    if posts.is_empty() {
        return;
    }
    let mut rooms: Vec<RoomId> = posts.iter().map(|p| p.post.room).collect();
    rooms.sort_unstable();
    rooms.dedup();
    for &room in &rooms {
        ledger.prepare(store, room, out);
    }
    let (losses, from) = (store.losses(), out.len());
    commit(store, posts, settings, out);
    ledger.record(&rooms, store.losses() != losses, &out[from..]);
}

fn auth_main(mut slot: StoreSlot, rx: &Receiver<Msg>, settings: &Settings, notify: &Notify) {
    // One argon2 working area for the thread's life (see `auth::Hasher`).
    let mut hasher = auth::Hasher::default();
    loop {
        slot.maintain();
        let work = match rx.recv_timeout(slot.wait()) {
            Ok(Msg::Work(work)) => work,
            Ok(Msg::Stop) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
        };
        let mut out = Vec::new();
        match work {
            Work::Auth(w) => {
                let to = w.reply_to();
                out.extend(w.run(&mut slot, &mut hasher, settings));
                out.extend(to.map(|to| Effect::Release { to, shared: false }));
            }
            other => run(other, &mut slot, settings, &mut out),
        }
        notify.send(out);
    }
}

/// Checkpoints the embedded store's WAL twice a second, off every commit path: a PASSIVE
/// checkpoint never waits for writers, and writers never wait for it. Its failures are not
/// outages (the workers' own calls tell those); it reopens its store and tries again.
fn housekeeping_main(url: &str, busy_timeout: Duration, stop: &Receiver<()>) {
    let options = OpenOptions { busy_timeout, ..OpenOptions::default() };
    let mut store: Option<Box<dyn Store>> = None;
    loop {
        match stop.recv_timeout(CHECKPOINT_EVERY) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if store.is_none() {
            store = chime_storage::open_with(url, &options).ok();
        }
        if let Some(s) = store.as_mut() {
            if let Err(e) = s.checkpoint() {
                log::debug!("checkpoint failed: {e}");
                if e.is_unavailable() {
                    store = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chime_storage::SessionLimits;

    /// SIGTERM ends with this: every worker must wake up, finish and exit.
    #[test]
    fn pool_shutdown_returns() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("t.db").display());
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = crossbeam_channel::bounded(16);
        let config = PoolConfig {
            workers: 2,
            auth_workers: 1,
            max_batch: 16,
            busy_timeout: Duration::from_secs(5),
            partition_size: chime_storage::DEFAULT_PARTITION_SIZE,
            settings: Settings {
                max_rooms_per_user: 10,
                session_limits: SessionLimits { idle_ms: 60_000, max_age_ms: 60_000 },
                notifier: None,
                content: None,
            },
            secret_keys: None,
        };
        let pool = Pool::start(&url, config, Notify { completions: tx, waker }).unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            pool.shutdown();
            let _ = done_tx.send(());
        });
        assert!(done_rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok(), "shutdown hung");
        drop(rx);
    }
}
