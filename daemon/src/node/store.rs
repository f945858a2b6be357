//! The agent's object store: files named by their SHA-256 under one root directory on the node.
//!
//! Layout: `ROOT/objects/ab/cdef...` (the first two hex digits of the hash name a fan-out
//! directory, the other 62 the file, so no directory holds more than 1/256 of the objects) and
//! `ROOT/tmp/` for uploads in progress, on the same filesystem so a rename moves them into place.
//!
//! The guarantee: **a path under `objects/` exists only with complete content that hashes to its
//! name.** An upload ([`Upload`]) is written to a new file in `tmp/`, hashed as it is written; at
//! the end its size and hash are checked, the file is fsynced, renamed into `objects/ab/`, and
//! that directory is fsynced (and `objects/` too when `ab/` was new), so after a crash at any
//! point the object is either absent or whole. What a crash can leave is a temp file; an agent
//! removes temp files older than a day when it starts (a younger one may belong to another
//! agent still writing it). Later damage (a flipped bit on disk) is what [`Store::check`] finds.

use super::proto::{BadKind, BadObject, ListEntry, ListPage, Sha256, Space};
use sha2::Digest;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Temp files older than this are leftovers of a crashed agent.
const STALE_TEMP: Duration = Duration::from_secs(24 * 3600);

/// Bytes hashed between two progress calls in [`Store::check`].
const CHECK_STEP: usize = 1 << 20;

/// An upload is flushed to disk every this many bytes, so the fsync at its end has at most this
/// much to write: a multi-gigabyte upload would otherwise leave the kernel's whole dirty-page
/// allowance for that one fsync, long enough for the client to give up waiting for STORED.
const SYNC_EVERY: u64 = 64 << 20;

/// Numbers temp files so that uploads of the same object never share one.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(1);

/// A content-addressed object store rooted at one directory.
#[derive(Debug)]
pub struct Store {
    /// The root, canonicalized.
    root: PathBuf,
    /// `ROOT/objects`: the fan-out directories.
    objects: PathBuf,
    /// `ROOT/tmp`: uploads in progress.
    tmp: PathBuf,
}

/// Why an upload was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// More or fewer bytes arrived than were announced.
    #[error("{received} bytes received for an object announced as {announced} bytes")]
    Size {
        /// The size the PUT announced.
        announced: u64,
        /// What arrived (at least; counting stops at the first byte too many).
        received: u64,
    },
    /// The content hashes to something else.
    #[error("the data hashes to {actual}, not {expected}")]
    Mismatch {
        /// The announced hash.
        expected: Sha256,
        /// The data's hash.
        actual: Sha256,
    },
    /// The disk failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What [`Store::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// No such object.
    Missing,
    /// The content hashes to the name.
    Good {
        /// Its size.
        size: u64,
    },
    /// The content is damaged or unreadable.
    Bad(BadObject),
    /// The progress callback asked to stop.
    Stopped,
}

impl Store {
    /// Opens (creating if needed, private to this user) the store at `root`, and removes stale
    /// temp files.
    pub fn open(root: &Path) -> io::Result<Store> {
        create_private_dir(root)?;
        let root = fs::canonicalize(root)?;
        let objects = root.join("objects");
        let tmp = root.join("tmp");
        for dir in [&objects, &tmp] {
            if create_private_dir(dir)? {
                sync_dir(&root)?;
            }
        }
        let store = Store { root, objects, tmp };
        store.remove_stale_temps();
        Ok(store)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an object lives.
    pub fn object_path(&self, sha256: &Sha256) -> PathBuf {
        let hex = sha256.to_hex();
        self.objects.join(&hex[..2]).join(&hex[2..])
    }

    /// The object's size, or `None` when it is not stored.
    pub fn stat(&self, sha256: &Sha256) -> io::Result<Option<u64>> {
        match fs::metadata(self.object_path(sha256)) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The object opened for reading, with its size; `None` when it is not stored.
    pub fn open_object(&self, sha256: &Sha256) -> io::Result<Option<(File, u64)>> {
        match File::open(self.object_path(sha256)) {
            Ok(file) => {
                let size = file.metadata()?.len();
                Ok(Some((file, size)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts an upload of `size` bytes that must hash to `sha256`.
    pub fn begin_put(&self, sha256: Sha256, size: u64) -> io::Result<Upload> {
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let temp = self.tmp.join(format!("{}.{}.{n}.part", sha256.to_hex(), std::process::id()));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&temp)?;
        Ok(Upload {
            file,
            temp,
            objects: self.objects.clone(),
            dest: self.object_path(&sha256),
            hasher: sha2::Sha256::new(),
            expected: sha256,
            size,
            written: 0,
            unsynced: 0,
            stored: false,
        })
    }

    /// Removes an object; `false` when there was none.
    pub fn delete(&self, sha256: &Sha256) -> io::Result<bool> {
        let path = self.object_path(sha256);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    sync_dir(dir)?;
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Bytes available to this user on the store's filesystem, and its size.
    pub fn filesystem_space(&self) -> io::Result<(u64, u64)> {
        let stat = rustix::fs::statvfs(&self.root).map_err(io::Error::from)?;
        let block = stat.f_frsize;
        Ok((stat.f_bavail.saturating_mul(block), stat.f_blocks.saturating_mul(block)))
    }

    /// The objects' count and total size (a walk over every fan-out directory's metadata: a
    /// hundred thousand objects take a fraction of a second) and the filesystem's space.
    pub fn space(&self) -> io::Result<Space> {
        let (free, total) = self.filesystem_space()?;
        let mut space = Space { free, total, ..Space::default() };
        for (_, dir) in self.fanout_dirs()? {
            for (_, path) in objects_in(&dir)? {
                // An object deleted since the directory was read is simply not counted.
                if let Ok(meta) = fs::metadata(&path) {
                    space.objects += 1;
                    space.used += meta.len();
                }
            }
        }
        Ok(space)
    }

    /// Up to `limit` objects with hashes greater than `after`, in ascending order.
    pub fn list(&self, after: Option<&Sha256>, limit: usize) -> io::Result<ListPage> {
        let first_dir = after.map_or(0, |sha| sha.0[0]);
        let mut page = ListPage::default();
        for (prefix, dir) in self.fanout_dirs()? {
            if prefix < first_dir {
                continue;
            }
            for (sha256, path) in objects_in(&dir)? {
                if after.is_some_and(|after| sha256 <= *after) {
                    continue;
                }
                if page.entries.len() == limit {
                    page.more = true;
                    return Ok(page);
                }
                if let Ok(meta) = fs::metadata(&path) {
                    page.entries.push(ListEntry { sha256, size: meta.len() });
                }
            }
        }
        Ok(page)
    }

    /// Every object's hash, in ascending order, one fan-out directory at a time (so the list in
    /// memory is at most one directory's).
    pub fn for_each_object(&self, mut f: impl FnMut(Sha256) -> bool) -> io::Result<()> {
        for (_, dir) in self.fanout_dirs()? {
            for (sha256, _) in objects_in(&dir)? {
                if !f(sha256) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Re-hashes one object. `progress` is called with the bytes hashed so far about every MiB;
    /// returning `false` stops the check ([`Check::Stopped`]).
    pub fn check(&self, sha256: &Sha256, progress: &mut dyn FnMut(u64) -> bool) -> Check {
        let unreadable =
            |e: io::Error| Check::Bad(BadObject { sha256: *sha256, kind: BadKind::UNREADABLE, detail: e.to_string() });
        let mut file = match File::open(self.object_path(sha256)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Check::Missing,
            Err(e) => return unreadable(e),
        };
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; CHECK_STEP];
        let mut size = 0u64;
        loop {
            match super::proto::read_up_to(&mut file, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    size += n as u64;
                    if !progress(size) {
                        return Check::Stopped;
                    }
                }
                Err(e) => return unreadable(e),
            }
        }
        let actual = Sha256(hasher.finalize().into());
        if actual == *sha256 {
            Check::Good { size }
        } else {
            Check::Bad(BadObject { sha256: *sha256, kind: BadKind::MISMATCH, detail: actual.to_hex() })
        }
    }

    /// The fan-out directories (`00` to `ff`) that exist, in order.
    fn fanout_dirs(&self) -> io::Result<Vec<(u8, PathBuf)>> {
        let mut dirs = Vec::new();
        for entry in fs::read_dir(&self.objects)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let mut prefix = [0u8; 1];
            if name.len() == 2 && hex::decode_to_slice(name, &mut prefix).is_ok() && name == name.to_lowercase() {
                dirs.push((prefix[0], entry.path()));
            }
        }
        dirs.sort();
        Ok(dirs)
    }

    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.tmp) else { return };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| now.duration_since(modified).ok())
                .is_some_and(|age| age > STALE_TEMP);
            if old {
                match fs::remove_file(entry.path()) {
                    Ok(()) => log::info!("removed stale upload {}", entry.path().display()),
                    Err(e) => log::warn!("cannot remove stale upload {}: {e}", entry.path().display()),
                }
            }
        }
    }
}

/// The objects in one fan-out directory, in ascending hash order. Names that are not 62
/// lower-case hex digits are not objects (an operator's stray file) and are skipped.
fn objects_in(dir: &Path) -> io::Result<Vec<(Sha256, PathBuf)>> {
    let Some(prefix) = dir.file_name().and_then(|n| n.to_str()) else { return Ok(Vec::new()) };
    let mut objects = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() != 62 || name != name.to_lowercase() {
            continue;
        }
        if let Some(sha256) = Sha256::from_hex(&format!("{prefix}{name}")) {
            objects.push((sha256, entry.path()));
        }
    }
    objects.sort();
    Ok(objects)
}

/// An object being uploaded: a temp file hashed as it is written. Dropping it before
/// [`Upload::finish`] succeeded removes the temp file.
#[derive(Debug)]
pub struct Upload {
    /// The temp file.
    file: File,
    /// Its path in `tmp/`.
    temp: PathBuf,
    /// `ROOT/objects`, fsynced when a new fan-out directory is made in it.
    objects: PathBuf,
    /// Where the object goes.
    dest: PathBuf,
    /// The hash of what was written so far.
    hasher: sha2::Sha256,
    /// The hash the content must have.
    expected: Sha256,
    /// The size the content must have.
    size: u64,
    /// Bytes written so far.
    written: u64,
    /// Bytes written since the last flush to disk.
    unsynced: u64,
    /// Set once renamed into place, so `Drop` leaves the file alone.
    stored: bool,
}

impl Upload {
    /// Appends a chunk. More bytes than announced is an error (and the upload is useless).
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), PutError> {
        let after = self.written + chunk.len() as u64;
        if after > self.size {
            return Err(PutError::Size { announced: self.size, received: after });
        }
        self.file.write_all(chunk)?;
        self.hasher.update(chunk);
        self.written = after;
        self.unsynced += chunk.len() as u64;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks size and hash, then makes the object durable and visible (see the module doc).
    pub fn finish(mut self) -> Result<(), PutError> {
        if self.written != self.size {
            return Err(PutError::Size { announced: self.size, received: self.written });
        }
        let actual = Sha256(std::mem::take(&mut self.hasher).finalize().into());
        if actual != self.expected {
            return Err(PutError::Mismatch { expected: self.expected, actual });
        }
        self.file.sync_all()?;
        let Some(dir) = self.dest.parent() else {
            return Err(PutError::Io(io::Error::other("an object path has no parent")));
        };
        if create_private_dir(dir)? {
            sync_dir(&self.objects)?;
        }
        fs::rename(&self.temp, &self.dest)?;
        self.stored = true;
        sync_dir(dir)?;
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.stored {
            if let Err(e) = fs::remove_file(&self.temp) {
                log::warn!("cannot remove the abandoned upload {}: {e}", self.temp.display());
            }
        }
    }
}

/// Creates `dir` (and parents) with mode 0700; `true` when `dir` itself was created.
fn create_private_dir(dir: &Path) -> io::Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    Ok(true)
}

/// Makes a directory's entries (a rename, a new file, a removal) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a whole small file; for tests and tools, never for objects on the data path.
#[cfg(test)]
fn read_all(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut out)).expect("readable");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, data: &[u8]) -> Sha256 {
        let sha = Sha256::digest(data);
        let mut upload = store.begin_put(sha, data.len() as u64).expect("begin");
        for chunk in data.chunks(7) {
            upload.write(chunk).expect("write");
        }
        upload.finish().expect("finish");
        sha
    }

    fn temps(store: &Store) -> usize {
        fs::read_dir(&store.tmp).expect("tmp").count()
    }

    #[test]
    fn a_finished_upload_is_an_object_named_by_its_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("root")).expect("open");
        let sha = put(&store, b"hello world");
        let path = store.object_path(&sha);
        assert!(path.starts_with(store.root().join("objects").join(&sha.to_hex()[..2])));
        assert_eq!(read_all(&path), b"hello world");
        assert_eq!(store.stat(&sha).expect("stat"), Some(11));
        assert_eq!(temps(&store), 0);
        assert_eq!(store.check(&sha, &mut |_| true), Check::Good { size: 11 });
        assert!(store.delete(&sha).expect("delete"));
        assert!(!store.delete(&sha).expect("delete again"));
        assert_eq!(store.stat(&sha).expect("stat"), None);
        assert_eq!(store.check(&sha, &mut |_| true), Check::Missing);
    }

    #[test]
    fn wrong_content_or_size_leaves_no_object_and_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let claimed = Sha256::digest(b"what was promised");

        let mut upload = store.begin_put(claimed, 5).expect("begin");
        upload.write(b"other").expect("write");
        assert!(matches!(upload.finish(), Err(PutError::Mismatch { .. })));

        let mut upload = store.begin_put(claimed, 3).expect("begin");
        assert!(matches!(upload.write(b"four"), Err(PutError::Size { announced: 3, received: 4 })));
        drop(upload);

        let mut upload = store.begin_put(claimed, 30).expect("begin");
        upload.write(b"short").expect("write");
        assert!(matches!(upload.finish(), Err(PutError::Size { announced: 30, received: 5 })));

        let upload = store.begin_put(claimed, 30).expect("begin");
        drop(upload); // abandoned mid-way

        assert_eq!(store.stat(&claimed).expect("stat"), None);
        assert_eq!(temps(&store), 0);
    }

    #[test]
    fn list_pages_in_hash_order_and_space_counts_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut shas: Vec<Sha256> = (0..40u32).map(|i| put(&store, format!("object {i}").as_bytes())).collect();
        shas.sort();
        // Stray files are not objects.
        fs::write(store.objects.join("README"), "x").expect("write");
        fs::create_dir_all(store.objects.join("zz")).expect("mkdir");

        let mut seen = Vec::new();
        let mut after = None;
        for _ in 0..100 {
            let page = store.list(after.as_ref(), 7).expect("list");
            assert!(page.entries.len() <= 7);
            seen.extend(page.entries.iter().map(|e| e.sha256));
            after = page.entries.last().map(|e| e.sha256);
            if !page.more {
                break;
            }
        }
        assert_eq!(seen, shas);

        let space = store.space().expect("space");
        assert_eq!(space.objects, 40);
        let used: u64 = (0..40u32).map(|i| format!("object {i}").len() as u64).sum();
        assert_eq!(space.used, used);
        assert!(space.total >= space.free && space.free > 0, "{space:?}");

        let mut walked = Vec::new();
        store
            .for_each_object(|sha| {
                walked.push(sha);
                true
            })
            .expect("walk");
        assert_eq!(walked, shas);
    }

    #[test]
    fn check_finds_a_flipped_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let sha = put(&store, &[5u8; 3000]);
        let path = store.object_path(&sha);
        let mut bytes = read_all(&path);
        bytes[1234] ^= 1;
        fs::write(&path, &bytes).expect("corrupt");
        let Check::Bad(bad) = store.check(&sha, &mut |_| true) else { panic!("expected bad") };
        assert_eq!(bad.kind, BadKind::MISMATCH);
        assert_eq!(bad.detail, Sha256::digest(&bytes).to_hex());
        assert_eq!(store.check(&sha, &mut |_| false), Check::Stopped);
    }

    #[test]
    fn stale_temps_are_removed_at_open_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let stale = store.tmp.join("stale.part");
        let fresh = store.tmp.join("fresh.part");
        fs::write(&stale, "x").expect("write");
        fs::write(&fresh, "x").expect("write");
        let two_days_ago = SystemTime::now() - Duration::from_secs(48 * 3600);
        File::options().write(true).open(&stale).expect("open").set_modified(two_days_ago).expect("set mtime");
        let _again = Store::open(dir.path()).expect("reopen");
        assert!(!stale.exists());
        assert!(fresh.exists());
    }
}
