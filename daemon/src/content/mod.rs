//! The content store: the bytes of uploaded files, addressed by their SHA-256, kept first in the
//! daemon's cache directory and, once the cache runs over its quota, on storage nodes reached
//! over SSH (see [`crate::node`]).
//!
//! This is the one door to file bytes for the rest of the daemon. The transfer path (uploads and
//! downloads over chat connections) stages an upload under [`Content::staging_path`], verifies its
//! hash, and hands the file over with [`Content::admit`]; a download reads with
//! [`Content::reader`], whichever disk the bytes are on; content whose last file record is gone is
//! dropped with [`Content::forget`]. Every call here does file I/O and may wait on a node: call it
//! from a file thread, never from the event loop. Moving content to nodes happens on the store's
//! own background thread, never on a caller's.
//!
//! - [`lru`]: which cached content was used least recently (in memory, cheap per access).
//! - [`index`]: the durable record (SQLite in the cache dir) of cached content, last uses and
//!   verified placements on nodes; and why it lives there.
//! - [`fetch`]: reading content from a node into the cache while readers follow, with failover.
//! - [`background`]: eviction over quota, reconciliation with the nodes, rebalance.
//!
//! **Guarantees.** Content leaves the cache only after `copies` nodes hold a verified copy and
//! the placements are recorded (fsynced) in the index: a crash at any step leaves the content
//! in the cache, on a node, or both, and a node copy is recorded only once the node has verified
//! it (a half-written copy is a temp file on the node, never an object, never a placement).
//! At open the cache directory is scanned and the index corrected; placements are re-checked
//! against each node's listing by the background thread before they are counted again.
//!
//! Layout of the cache directory: `objects/ab/<64 hex>` holds complete, verified content only
//! (written by rename after an fsync, so a crash never leaves a half object under its name);
//! `uploads/<name>.part` holds uploads in progress; `fetch/` content being read back from a node;
//! `index.sqlite` the index; `lock` is held (flock) by the process that has the store open;
//! `rebalance.request` / `rebalance.*.json` carry `chimed admin rebalance` to the running daemon.

pub mod background;
pub mod fetch;
pub mod index;
pub mod lru;

use crate::node::{Nodes, Reachability, Sha256};
use fetch::{Fetch, Follow, Outcome};
use index::Index;
use lru::Lru;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

pub use background::RebalanceReport;

/// Stripes of the per-content lock: content hashes spread over them evenly.
const LOCK_STRIPES: usize = 64;

/// The environment variable of the crash test hook: `after_put` aborts the process right after a
/// node stored a copy (before its placement is recorded), `after_record` right after the
/// placements are recorded (before the local copy is deleted). For tests of crash safety only.
pub const CRASH_ENV: &str = "CHIMED_TEST_CRASH";

/// Default time between two background rebalances.
pub const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_secs(3600);

/// Why content could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// No copy of the content exists anywhere the daemon knows of.
    #[error("content {0} not found")]
    NotFound(Sha256),
    /// The content exists, but no copy can be reached now (its nodes are down or slow): a retry
    /// later can succeed.
    #[error("content {0} unavailable for now: {1}")]
    Unavailable(Sha256, String),
    /// A local disk error.
    #[error("content store: {0}")]
    Io(#[from] io::Error),
}

impl ContentError {
    /// Whether asking again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ContentError::Unavailable(..))
    }
}

/// Where the crash hook fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrashPoint {
    AfterPut,
    AfterRecord,
}

/// The content store of one daemon. Dropping it stops its background thread; a fetch from a node
/// still in flight keeps the directory locked until it ends.
pub struct Content {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the background thread ends.
    ended: crossbeam_channel::Receiver<()>,
}

/// How long dropping the store waits for its background thread (which may be in the middle of a
/// put to a node) before leaving it to end on its own: shutdown has a 10 s budget.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// What the store's callers and its background thread share.
pub(crate) struct Inner {
    /// The cache directory.
    dir: PathBuf,
    /// Bytes the cache may hold.
    quota: u64,
    /// The storage nodes.
    nodes: Arc<Nodes>,
    /// The per-content lock stripes.
    locks: Vec<Mutex<()>>,
    /// The durable record.
    index: Mutex<Index>,
    /// Cached content by last use.
    lru: Mutex<Lru>,
    /// Placements verified by this process (a put it saw stored, or a node's listing): only
    /// these count towards `copies` before a local copy is deleted.
    confirmed: Mutex<HashSet<(Sha256, String)>>,
    /// Fetches from nodes in progress, with their temp files.
    fetches: Mutex<HashMap<Sha256, (Arc<Fetch>, PathBuf)>>,
    /// Wakes the background thread.
    signal: Mutex<Signal>,
    wake: Condvar,
    /// Temp file names.
    next_temp: AtomicU64,
    /// The LRU tick at the previous rebalance: content not used since is cold.
    cold_mark: Mutex<u64>,
    /// Held while evicting, so the background thread and a caller's rebalance do not move the
    /// same content at once.
    evicting: Mutex<()>,
    /// Held by the rebalance running, so an on-demand one and the hourly one do not overlap.
    rebalancing: Mutex<()>,
    /// The test hook.
    crash: Option<CrashPoint>,
    /// Held (flock) while the store is open, so two processes never manage one cache.
    _lock_file: File,
}

/// Requests to the background thread.
#[derive(Debug)]
struct Signal {
    stop: bool,
    /// Something changed (an admit, a fetch): look at the quota now.
    kick: bool,
    /// Time between rebalances.
    rebalance_every: Duration,
}

pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Content {
    /// Opens (creating if needed) the cache directory `dir`, which may hold `quota` bytes before
    /// content moves to `nodes`. Scans the cache and corrects the index, then starts the
    /// background thread (eviction, reconciliation, an hourly rebalance). Fails with
    /// `WouldBlock` when another process has the directory open.
    pub fn open(dir: &Path, quota: u64, nodes: Arc<Nodes>) -> io::Result<Content> {
        let inner = Arc::new(Inner::open(dir, quota, nodes)?);
        let (alive, ended) = crossbeam_channel::bounded::<()>(0);
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new().name("content".into()).spawn(move || {
                let _alive = alive;
                background::run(&inner)
            })?
        };
        Ok(Content { inner, thread: Some(thread), ended })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Bytes the cache may hold.
    pub fn quota(&self) -> u64 {
        self.inner.quota
    }

    /// The configured storage nodes.
    pub fn nodes(&self) -> &Nodes {
        &self.inner.nodes
    }

    /// Bytes cached now.
    pub fn cached_bytes(&self) -> u64 {
        lock(&self.inner.lru).bytes()
    }

    /// Whether the cache holds `sha` (as opposed to only a node).
    pub fn is_cached(&self, sha: Sha256) -> bool {
        lock(&self.inner.lru).contains(sha)
    }

    /// The nodes with a recorded copy of `sha`.
    pub fn placements(&self, sha: Sha256) -> io::Result<Vec<String>> {
        Ok(lock(&self.inner.index).placements(sha)?.into_iter().map(|p| p.node).collect())
    }

    /// Sets how often the background rebalance runs (default hourly).
    pub fn set_rebalance_interval(&self, every: Duration) {
        lock(&self.inner.signal).rebalance_every = every.max(Duration::from_secs(1));
        self.inner.wake.notify_all();
    }

    /// Runs a rebalance now, on the calling thread (see [`background`]).
    pub fn rebalance(&self) -> RebalanceReport {
        background::rebalance(&self.inner)
    }

    /// Moves least recently used content to nodes until the cache is under its quota, on the
    /// calling thread (the background thread does this on its own; for tests and tools).
    pub fn evict_now(&self) -> usize {
        background::evict(&self.inner)
    }

    /// Serializes what is done to content `sha` across threads. Admitting an upload and
    /// recording its file, and collecting content whose last record is gone (re-checking that
    /// no record appeared), each run under it, so a collection can never delete bytes that a
    /// concurrent upload of the same content has just been told are stored.
    pub fn lock(&self, sha: Sha256) -> MutexGuard<'_, ()> {
        self.inner.lock(sha)
    }

    /// Where the upload named `name` (letters, digits, '-' and '_' only: the caller's upload id)
    /// keeps its bytes until it is admitted.
    pub fn staging_path(&self, name: &str) -> PathBuf {
        self.inner.dir.join("uploads").join(format!("{name}.part"))
    }

    /// Takes a staged upload, already verified to be `size` bytes hashing to `sha`, into the
    /// store. Durable when it returns. If the content is already stored, the staged file is
    /// removed and `false` returned (the same bytes are kept once). Never waits for a node:
    /// moving content out when the cache is over quota is the background thread's work.
    pub fn admit(&self, staged: &Path, sha: Sha256, size: u64) -> io::Result<bool> {
        self.inner.admit(staged, sha, size)
    }

    /// Whether content `sha` is stored (in the cache or on a node).
    pub fn has(&self, sha: Sha256) -> bool {
        if lock(&self.inner.lru).contains(sha) {
            return true;
        }
        let index = lock(&self.inner.index);
        let live = index.object(sha).ok().flatten().is_some_and(|o| !o.forgotten);
        live && index.placements(sha).is_ok_and(|p| !p.is_empty())
    }

    /// The bytes of content `sha` from `offset` on, streamed: from the cache, or from a node
    /// holding it (failing over to another copy; the fetched content is kept in the cache). A
    /// reader from a node fails mid-way with an `io::Error` wrapping
    /// [`ContentError::Unavailable`] if every node holding it fails.
    pub fn reader(&self, sha: Sha256, offset: u64) -> Result<Box<dyn Read + Send>, ContentError> {
        self.inner.reader(sha, offset)
    }

    /// Drops content `sha`, which no file record refers to any more, from the cache and every
    /// node. The caller holds [`Content::lock`]`(sha)`. A node that cannot be reached now keeps
    /// its copy until the background thread deletes it (the intent is recorded first).
    pub fn forget(&self, sha: Sha256) -> io::Result<()> {
        self.inner.forget(sha)
    }
}

impl Drop for Content {
    fn drop(&mut self) {
        lock(&self.inner.signal).stop = true;
        self.inner.wake.notify_all();
        // A put in flight is bounded by the link's deadlines but may outlast a shutdown's
        // budget; nothing is lost by leaving it (a put without its record is adopted later).
        if let Err(crossbeam_channel::RecvTimeoutError::Disconnected) = self.ended.recv_timeout(STOP_WAIT) {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        } else {
            log::warn!("content: the background thread is still busy with a node; not waiting for it");
        }
    }
}

impl Inner {
    fn open(dir: &Path, quota: u64, nodes: Arc<Nodes>) -> io::Result<Inner> {
        for sub in ["objects", "uploads", "fetch"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let lock_file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock"))?;
        rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            let e = io::Error::from(e);
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::WouldBlock, format!("{} is in use by another process", dir.display()))
            } else {
                e
            }
        })?;
        // Fetches of a previous run: incomplete, or complete but not moved in; either way a
        // node still has the content.
        for entry in fs::read_dir(dir.join("fetch"))?.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        let index = Index::open(&dir.join("index.sqlite"))?;
        let crash = match std::env::var(CRASH_ENV).as_deref() {
            Ok("after_put") => Some(CrashPoint::AfterPut),
            Ok("after_record") => Some(CrashPoint::AfterRecord),
            _ => None,
        };
        let inner = Inner {
            dir: dir.to_path_buf(),
            quota,
            nodes,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            index: Mutex::new(index),
            lru: Mutex::new(Lru::starting_after(0)),
            confirmed: Mutex::new(HashSet::new()),
            fetches: Mutex::new(HashMap::new()),
            signal: Mutex::new(Signal { stop: false, kick: true, rebalance_every: DEFAULT_REBALANCE_INTERVAL }),
            wake: Condvar::new(),
            next_temp: AtomicU64::new(0),
            cold_mark: Mutex::new(0),
            rebalancing: Mutex::new(()),
            evicting: Mutex::new(()),
            crash,
            _lock_file: lock_file,
        };
        inner.scan()?;
        // Cold is relative to the last rebalance, which may have been in an earlier run.
        let mark = lock(&inner.index).cold_mark()?;
        lock(&inner.lru).advance_to(mark);
        *lock(&inner.cold_mark) = mark;
        Ok(inner)
    }

    /// Makes the index agree with the cache directory, and rebuilds the LRU order from it.
    fn scan(&self) -> io::Result<()> {
        let mut on_disk: HashMap<Sha256, u64> = HashMap::new();
        for prefix in fs::read_dir(self.dir.join("objects"))?.flatten() {
            let Ok(files) = fs::read_dir(prefix.path()) else { continue };
            for file in files.flatten() {
                let name = file.file_name();
                let Some(sha) = name.to_str().and_then(Sha256::from_hex) else { continue };
                if let Ok(meta) = file.metadata() {
                    on_disk.insert(sha, meta.len());
                }
            }
        }
        let index = lock(&self.index);
        let mut lru = lock(&self.lru);
        let mut known = HashSet::new();
        for object in index.objects()? {
            known.insert(object.sha);
            match on_disk.get(&object.sha) {
                // A forget was under way: finish the local part of it.
                Some(_) if object.forgotten => {
                    let _ = fs::remove_file(self.object_path(object.sha));
                }
                Some(&size) => {
                    if !object.cached || size != object.size {
                        index.set_cached(object.sha, size, object.last_access)?;
                    }
                    lru.restore(object.sha, size, object.last_access);
                }
                None if object.cached => index.set_uncached(object.sha)?,
                None => {}
            }
        }
        // Admitted, but the process died before the index heard of it.
        for (sha, size) in on_disk {
            if !known.contains(&sha) {
                index.set_cached(sha, size, 0)?;
                lru.restore(sha, size, 0);
            }
        }
        log::info!("content: cache {} holds {} objects, {} bytes", self.dir.display(), lru.len(), lru.bytes());
        Ok(())
    }

    fn lock(&self, sha: Sha256) -> MutexGuard<'_, ()> {
        let stripe = usize::from(sha.0[0]) % self.locks.len();
        // A poisoned stripe only means another thread panicked while holding it; the lock
        // guards no data of its own.
        lock(&self.locks[stripe])
    }

    /// Where content `sha` lives in the cache.
    fn object_path(&self, sha: Sha256) -> PathBuf {
        let hex = sha.to_hex();
        self.dir.join("objects").join(&hex[..2]).join(hex)
    }

    fn temp_path(&self, sha: Sha256) -> PathBuf {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        self.dir.join("fetch").join(format!("{}.{n}.part", sha.to_hex()))
    }

    fn crash_point(&self, point: CrashPoint) {
        if self.crash == Some(point) {
            log::error!("{CRASH_ENV}: aborting at {point:?}, as the test asked");
            std::process::abort();
        }
    }

    fn stopping(&self) -> bool {
        lock(&self.signal).stop
    }

    fn kick(&self) {
        lock(&self.signal).kick = true;
        self.wake.notify_all();
    }

    /// Moves a complete, verified file into the cache under `sha` (fsync, rename, directory
    /// fsync), records it, and returns `false` when it was already cached.
    fn move_in(&self, from: &Path, sha: Sha256) -> io::Result<bool> {
        let target = self.object_path(sha);
        if lock(&self.lru).contains(sha) && target.exists() {
            fs::remove_file(from)?;
            lock(&self.lru).touch(sha, fs::metadata(&target)?.len());
            return Ok(false);
        }
        let size = {
            let file = File::open(from)?;
            file.sync_all()?;
            file.metadata()?.len()
        };
        let parent = target.parent().ok_or_else(|| io::Error::other("object path has no parent"))?;
        fs::create_dir_all(parent)?;
        fs::rename(from, &target)?;
        File::open(parent)?.sync_all()?;
        let tick = lock(&self.lru).touch(sha, size);
        lock(&self.index).set_cached(sha, size, tick)?;
        if lock(&self.lru).bytes() > self.quota {
            self.kick();
        }
        Ok(true)
    }

    fn admit(&self, staged: &Path, sha: Sha256, size: u64) -> io::Result<bool> {
        let placed = {
            let index = lock(&self.index);
            index.object(sha)?.is_some_and(|o| !o.forgotten) && !index.placements(sha)?.is_empty()
        };
        let actual = fs::metadata(staged)?.len();
        if actual != size {
            log::warn!("content {sha}: admitted as {size} bytes but the staged file has {actual}");
        }
        let fresh = self.move_in(staged, sha)?;
        // Already on a node: a new upload of it is kept cached (it is hot), but it was stored.
        Ok(fresh && !placed)
    }

    fn reader(self: &Arc<Self>, sha: Sha256, offset: u64) -> Result<Box<dyn Read + Send>, ContentError> {
        match File::open(self.object_path(sha)) {
            Ok(mut file) => {
                let size = file.metadata()?.len();
                lock(&self.lru).touch(sha, size);
                file.seek(SeekFrom::Start(offset))?;
                return Ok(Box::new(file));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let (fetch, file) = self.start_fetch(sha)?;
        match fetch.wait_started() {
            Some(Outcome::Failed { reason, retryable: true }) => Err(ContentError::Unavailable(sha, reason)),
            Some(Outcome::Failed { reason, retryable: false }) => {
                log::warn!("content {sha}: no copy could be read: {reason}");
                Err(ContentError::NotFound(sha))
            }
            _ => Ok(Box::new(Follow { fetch, file, pos: offset, sha })),
        }
    }

    /// Joins the fetch of `sha` in progress, or starts one; returns it with the temp file open.
    fn start_fetch(self: &Arc<Self>, sha: Sha256) -> Result<(Arc<Fetch>, File), ContentError> {
        let mut fetches = lock(&self.fetches);
        if let Some((fetch, path)) = fetches.get(&sha) {
            return Ok((fetch.clone(), File::open(path)?));
        }
        // Forgotten content whose node copies a down node kept is not content any more.
        if lock(&self.index).object(sha)?.is_none_or(|o| o.forgotten) {
            return Err(ContentError::NotFound(sha));
        }
        let links = self.holders(sha)?;
        if links.is_empty() {
            return Err(ContentError::NotFound(sha));
        }
        let path = self.temp_path(sha);
        let writer = File::create(&path)?;
        let follower = File::open(&path)?;
        let fetch = Arc::new(Fetch::default());
        fetches.insert(sha, (fetch.clone(), path.clone()));
        drop(fetches);
        let job = FetchJob { sha, links, path, fetch: fetch.clone() };
        let inner = self.clone();
        let spawned =
            std::thread::Builder::new().name("content-fetch".into()).spawn(move || inner.run_fetch(job, writer));
        if let Err(e) = spawned {
            lock(&self.fetches).remove(&sha);
            return Err(e.into());
        }
        Ok((fetch, follower))
    }

    /// The links of the nodes recorded as holding `sha`: those not known to be down first, then
    /// the operator's priority, then the fastest.
    fn holders(&self, sha: Sha256) -> io::Result<Vec<crate::node::NodeLink>> {
        let placements = lock(&self.index).placements(sha)?;
        let mut links: Vec<_> = placements.iter().filter_map(|p| self.nodes.get(&p.node).cloned()).collect();
        let down = |l: &crate::node::NodeLink| matches!(l.reachability(), Reachability::Down { .. });
        links.sort_by(|a, b| down(a).cmp(&down(b)).then(b.speed().unwrap_or(0.0).total_cmp(&a.speed().unwrap_or(0.0))));
        Ok(links)
    }

    fn run_fetch(&self, job: FetchJob, writer: File) {
        let FetchJob { sha, links, path, fetch } = job;
        let (outcome, missing) = fetch::run(&fetch, sha, &links, writer);
        for node in missing {
            log::warn!("content {sha}: node {node} has no copy although one was recorded; record dropped");
            let _ = lock(&self.index).remove_placement(sha, &node);
            lock(&self.confirmed).remove(&(sha, node));
        }
        // Readers finish now: every byte is in the temp file and the hash matched. Syncing and
        // renaming it into the cache (a second or so for 100 MB) is not their wait.
        let done = matches!(outcome, Outcome::Done);
        fetch.finish(outcome);
        let _guard = self.lock(sha);
        lock(&self.fetches).remove(&sha);
        if done {
            let live = lock(&self.index).object(sha).ok().flatten().is_some_and(|o| !o.forgotten);
            // Kept in the cache: the content keeps its placements, so when the LRU evicts it
            // again that costs an unlink, not a transfer.
            let kept = live && self.move_in(&path, sha).map_err(|e| log::warn!("content {sha}: {e}")).is_ok();
            if !kept {
                let _ = fs::remove_file(&path);
            }
        } else {
            let _ = fs::remove_file(&path);
        }
    }

    fn forget(&self, sha: Sha256) -> io::Result<()> {
        lock(&self.index).set_forgotten(sha)?;
        lock(&self.lru).remove(sha);
        match fs::remove_file(self.object_path(sha)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.delete_placements(sha);
        Ok(())
    }

    /// Deletes every recorded copy of `sha` on the nodes; what cannot be deleted now stays
    /// recorded (and the object marked forgotten) for the background thread.
    fn delete_placements(&self, sha: Sha256) {
        let placements = lock(&self.index).placements(sha).unwrap_or_default();
        for p in placements {
            let Some(link) = self.nodes.get(&p.node) else { continue };
            match link.delete(sha) {
                Ok(_) => {
                    let _ = lock(&self.index).remove_placement(sha, &p.node);
                    lock(&self.confirmed).remove(&(sha, p.node));
                }
                Err(e) => log::warn!("content {sha}: copy on node {} not deleted yet: {e}", p.node),
            }
        }
    }
}

struct FetchJob {
    sha: Sha256,
    links: Vec<crate::node::NodeLink>,
    path: PathBuf,
    fetch: Arc<Fetch>,
}

#[cfg(test)]
mod tests;
