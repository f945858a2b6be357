//! Reading content that is not cached: one thread fetches it from a node into a temp file of the
//! cache (`fetch/`), and any number of readers follow that file as it fills. Nothing is held in
//! memory beyond one chunk; the first byte reaches a reader as soon as the node sends it.
//!
//! Failover: the fetch tries the nodes holding a copy one after the other; when a node fails
//! mid-way (ssh killed, node silent past the link's `reply_timeout`), the next one continues
//! from the byte where the file stopped (a range GET), so a reader never sees the switch. The
//! fetch hashes what it writes and checks the whole at the end; only then is the file moved into
//! the cache (see [`super::Content`]: re-cached content keeps its placements, so evicting it again
//! later costs an unlink, not a transfer).

use crate::node::{NodeError, NodeLink, Sha256};
use sha2::Digest;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// How a fetch ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every byte is in the file and the hash matched.
    Done,
    /// No node could serve it: `retryable` says whether a later attempt may succeed.
    Failed {
        /// Why.
        reason: String,
        /// Whether any node failed for a reason that passes.
        retryable: bool,
    },
}

/// Progress of one fetch, shared by its thread and its readers.
#[derive(Debug, Default)]
pub struct Fetch {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes in the temp file so far.
    written: u64,
    /// Set once, at the end.
    outcome: Option<Outcome>,
}

impl Fetch {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the first byte is there or the fetch has ended; returns the outcome if ended
    /// without a byte.
    pub fn wait_started(&self) -> Option<Outcome> {
        let mut state = self.lock();
        loop {
            if state.written > 0 {
                return None;
            }
            if let Some(outcome) = &state.outcome {
                return Some(outcome.clone());
            }
            state = self.changed.wait_timeout(state, Duration::from_secs(1)).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn advance(&self, n: u64) {
        self.lock().written += n;
        self.changed.notify_all();
    }

    /// Ends the fetch.
    pub fn finish(&self, outcome: Outcome) {
        self.lock().outcome = Some(outcome);
        self.changed.notify_all();
    }

    /// Bytes fetched so far.
    pub fn written(&self) -> u64 {
        self.lock().written
    }
}

/// Runs a fetch of `sha` into `file` from the first of `nodes` that serves it, failing over to
/// the next. Returns the nodes that answered NOT_FOUND (their placement records are wrong).
pub fn run(fetch: &Fetch, sha: Sha256, nodes: &[NodeLink], mut file: File) -> (Outcome, Vec<String>) {
    let mut hasher = sha2::Sha256::new();
    let mut reasons = Vec::new();
    let mut retryable = false;
    let mut missing = Vec::new();
    for link in nodes {
        let offset = fetch.written();
        let mut out = Follower { file: &mut file, hasher: &mut hasher, fetch };
        match link.get(sha, offset, None, &mut out) {
            Ok(_) => {
                let actual = Sha256(std::mem::take(&mut hasher).finalize().into());
                if actual != sha {
                    let reason = format!("the copy fetched hashes to {actual}");
                    return (Outcome::Failed { reason, retryable: false }, missing);
                }
                // Not synced here: readers need not wait for the disk; keeping the file in the
                // cache syncs it before it is renamed in.
                return (Outcome::Done, missing);
            }
            Err(NodeError::NotFound { .. }) => {
                missing.push(link.name().to_owned());
                reasons.push(format!("node {} does not have it", link.name()));
            }
            Err(NodeError::Local { what, source }) => {
                // Our own disk: another node would not help.
                let reason = format!("{what}: {source}");
                return (Outcome::Failed { reason, retryable: true }, missing);
            }
            Err(e) => {
                retryable |= e.is_retryable();
                log::warn!("content {sha}: fetch from node {} failed, trying the next copy: {e}", link.name());
                reasons.push(e.to_string());
            }
        }
    }
    if reasons.is_empty() {
        reasons.push("no node holds a copy".into());
    }
    (Outcome::Failed { reason: reasons.join("; "), retryable }, missing)
}

/// The fetch's writer: appends to the temp file, hashes, and tells the readers.
struct Follower<'a> {
    file: &'a mut File,
    hasher: &'a mut sha2::Sha256,
    fetch: &'a Fetch,
}

impl Write for Follower<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all(buf)?;
        self.hasher.update(buf);
        self.fetch.advance(buf.len() as u64);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader of a fetch in progress: reads the temp file up to what has been written, and waits
/// for more until the fetch ends. A fetch that failed for a reason that passes is an error of
/// kind `Other` wrapping [`super::ContentError::Unavailable`] (retry later); a bad copy is
/// `InvalidData`.
pub struct Follow {
    /// The fetch being followed.
    pub fetch: Arc<Fetch>,
    /// The temp file (the same inode once it is renamed into the cache).
    pub file: File,
    /// The next byte to read.
    pub pos: u64,
    /// The content, for errors.
    pub sha: Sha256,
}

impl Read for Follow {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut state = self.fetch.lock();
        loop {
            if state.written > self.pos {
                let n = ((state.written - self.pos) as usize).min(buf.len());
                drop(state);
                let n = self.file.read_at(&mut buf[..n], self.pos)?;
                self.pos += n as u64;
                return Ok(n);
            }
            match &state.outcome {
                Some(Outcome::Done) => return Ok(0),
                Some(Outcome::Failed { reason, retryable }) => {
                    if *retryable {
                        return Err(io::Error::other(super::ContentError::Unavailable(self.sha, reason.clone())));
                    }
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("content {}: {reason}", self.sha)));
                }
                None => {}
            }
            // The fetch's node calls have deadlines, so this ends.
            state = self
                .fetch
                .changed
                .wait_timeout(state, Duration::from_secs(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
