//! The content store: the bytes of uploaded files, addressed by their SHA-256, kept first in the
//! daemon's cache directory and, once the cache runs short, on storage nodes reached over SSH
//! (see [`crate::node`]).
//!
//! This is the one door to file bytes for the rest of the daemon. The transfer path (uploads and
//! downloads over chat connections) stages an upload under [`Content::staging_path`], verifies its
//! hash, and hands the file over with [`Content::admit`]; a download reads with
//! [`Content::reader`], whichever disk the bytes are on; content whose last file record is gone is
//! dropped with [`Content::forget`]. Every call here does file I/O and may wait on a node: call it
//! from a file thread, never from the event loop.
//!
//! Layout of the cache directory: `objects/ab/<64 hex>` holds complete, verified content only
//! (written by rename after an fsync, so a crash never leaves a half object under its name);
//! `uploads/<name>.part` holds uploads in progress.

use crate::node::{Nodes, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Stripes of the per-content lock: content hashes spread over them evenly.
const LOCK_STRIPES: usize = 64;

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

/// The content store of one daemon.
pub struct Content {
    dir: PathBuf,
    quota: u64,
    nodes: Arc<Nodes>,
    locks: Vec<Mutex<()>>,
}

impl Content {
    /// Opens (creating if needed) the cache directory `dir`, which may hold `quota` bytes before
    /// content moves to `nodes`.
    pub fn open(dir: &Path, quota: u64, nodes: Arc<Nodes>) -> io::Result<Content> {
        fs::create_dir_all(dir.join("objects"))?;
        fs::create_dir_all(dir.join("uploads"))?;
        let locks = (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        Ok(Content { dir: dir.to_path_buf(), quota, nodes, locks })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the cache may hold.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// The configured storage nodes.
    pub fn nodes(&self) -> &Nodes {
        &self.nodes
    }

    /// Serializes what is done to content `sha` across threads. Admitting an upload and
    /// recording its file, and collecting content whose last record is gone (re-checking that
    /// no record appeared), each run under it, so a collection can never delete bytes that a
    /// concurrent upload of the same content has just been told are stored.
    pub fn lock(&self, sha: Sha256) -> MutexGuard<'_, ()> {
        let stripe = usize::from(sha.0[0]) % self.locks.len();
        // A poisoned stripe only means another thread panicked while holding it; the lock
        // guards no data of its own.
        self.locks[stripe].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the upload named `name` (letters, digits, '-' and '_' only: the caller's upload id)
    /// keeps its bytes until it is admitted.
    pub fn staging_path(&self, name: &str) -> PathBuf {
        self.dir.join("uploads").join(format!("{name}.part"))
    }

    /// Where content `sha` lives in the cache.
    fn object_path(&self, sha: Sha256) -> PathBuf {
        let hex = sha.to_hex();
        self.dir.join("objects").join(&hex[..2]).join(hex)
    }

    /// Takes a staged upload, already verified to be `size` bytes hashing to `sha`, into the
    /// store. Durable when it returns. If the content is already stored, the staged file is
    /// removed and `false` returned (the same bytes are kept once).
    pub fn admit(&self, staged: &Path, sha: Sha256, size: u64) -> io::Result<bool> {
        let _ = size;
        let target = self.object_path(sha);
        if target.exists() {
            fs::remove_file(staged)?;
            return Ok(false);
        }
        File::open(staged)?.sync_all()?;
        let parent = target.parent().ok_or_else(|| io::Error::other("object path has no parent"))?;
        fs::create_dir_all(parent)?;
        fs::rename(staged, &target)?;
        File::open(parent)?.sync_all()?;
        Ok(true)
    }

    /// Whether content `sha` is stored.
    pub fn has(&self, sha: Sha256) -> bool {
        self.object_path(sha).exists()
    }

    /// The bytes of content `sha` from `offset` on, streamed: from the cache, or from a node
    /// holding it.
    pub fn reader(&self, sha: Sha256, offset: u64) -> Result<Box<dyn Read + Send>, ContentError> {
        let mut file = match File::open(self.object_path(sha)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ContentError::NotFound(sha)),
            Err(e) => return Err(e.into()),
        };
        file.seek(SeekFrom::Start(offset))?;
        Ok(Box::new(file))
    }

    /// Drops content `sha`, which no file record refers to any more, from the cache and every
    /// node.
    pub fn forget(&self, sha: Sha256) -> io::Result<()> {
        match fs::remove_file(self.object_path(sha)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}
