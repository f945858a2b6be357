//! Files: uploads in chunks over the chat connection, downloads streamed back in a window of
//! chunks, forwards, and collecting content that no file record refers to any more.
//!
//! Where each step runs, and why:
//! - On the loop (admission, in the core's `files` part, which knows the connection's open
//!   uploads and downloads): only checks and bookkeeping. No file is touched there.
//! - On a shard worker with the store: beginning and resuming an upload (its durable session),
//!   the permission check of a download, recording a verified upload (`FILE_SHARED` appends to
//!   the room's log, so it runs on the room's shard, [`ShareJob`]), forwards.
//! - On a file thread ([`FileThread`], see `worker`): writing chunks, hashing, the fsync before
//!   FINISH is answered, reading a download's chunks. A job's `order` key is its upload id (or
//!   its download), so one upload's chunks are written in the order they arrived.
//!
//! Durability: a chunk is acknowledged once written to the staging file (page cache); FINISH is
//! acknowledged only after the staged bytes are fsynced, moved into the content store (itself
//! fsynced, see `content`), and the file record with its delta is committed. A crash before
//! FINISH loses at most the tail of an upload, and RESUME reports what the staging file really
//! holds. The SHA-256 check at FINISH covers every byte whatever happened in between.
//!
//! Content and its records: the collector ([`collect`]) and a new record of the same content
//! ([`ShareJob`], [`ForwardJob`]) each run under [`Content::lock`] for that hash, and the
//! collector drops the content row only if its count is still zero, so it can never delete bytes
//! that a concurrent upload or forward of the same content has just been told are stored.

use super::{invalid, Admitted, Ctx};
use crate::content::Content;
use crate::limits::MAX_TEXT;
use crate::node::Sha256;
use crate::work::{
    refuse, reply, store_error, wire_delta, Actor, ContentRef, Effect, FileJob, FileWork, Published, ReplyTo, RoomWork,
    Settings, SharedWork, Work,
};
use chime_protocol::{
    ChunkStored, DownloadMeta, ErrorBody, ErrorCode, FileChunk, FileStored, Forward, ServerFrame, UploadBegin,
    UploadResume, UploadState,
};
use chime_storage::files::{valid_media_type, valid_name};
use chime_storage::{now_ms, NewFile, NewUpload, RoomId, SharedStore, Store, UploadRecord};
use sha2::Digest;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

/// The largest upload chunk and the size of download chunks: small enough that a chat frame
/// queued behind one waits only for it, large enough that per-frame costs vanish.
pub const CHUNK_SIZE: u32 = 64 * 1024;
/// Upload chunks a client may have unacknowledged (the server stops reading the connection
/// beyond it, so it is also the bound on chunk memory per connection).
pub const UPLOAD_WINDOW: u32 = 16;
/// Download chunks in flight beyond the client's last acknowledgement.
pub const DOWNLOAD_WINDOW: u32 = 16;
/// Uploads one connection may have open at once.
pub const MAX_OPEN_UPLOADS: usize = 8;
/// Downloads one connection may have streaming at once.
pub const MAX_DOWNLOADS: usize = 4;
/// Upload states a file thread keeps open (file handle and running hash); past it, the oldest is
/// dropped and its hash recomputed from disk at FINISH.
const THREAD_UPLOADS: usize = 64;

/// The staging name of upload `id` in the content store.
fn staging_name(id: u64) -> String {
    format!("upload-{id}")
}

fn content_of(settings: &Settings) -> Result<&Arc<Content>, ErrorBody> {
    settings
        .content
        .as_ref()
        .map(|c: &ContentRef| &c.0)
        .ok_or_else(|| ErrorBody::new(ErrorCode::INTERNAL, "this server keeps no files"))
}

fn io_error(what: &str, e: &io::Error) -> ErrorBody {
    log::error!("{what}: {e}");
    ErrorBody::new(ErrorCode::INTERNAL, format!("{what} failed on the server"))
}

/// The state an upload shows its client.
fn state(upload: &UploadRecord, offset: u64) -> ServerFrame {
    ServerFrame::UploadState(UploadState {
        upload: upload.id,
        offset,
        size: upload.size,
        chunk_size: CHUNK_SIZE,
        window: UPLOAD_WINDOW,
    })
}

/// Admits UPLOAD_BEGIN: the name, type and size are checked here; the room and the right to post
/// by the store.
pub fn begin(ctx: &mut Ctx<'_>, b: UploadBegin) -> Result<Admitted, ErrorBody> {
    if !valid_name(&b.name) {
        return Err(invalid("a file name is 1 to 255 bytes with no '/' or control characters"));
    }
    if !valid_media_type(&b.media_type) {
        return Err(invalid("a media type is at most 127 bytes with no spaces or control characters"));
    }
    let max = ctx.config.files.max_size;
    if b.size > max {
        let message = format!("the file is {} bytes; this server takes at most {max}", b.size);
        return Err(ErrorBody::new(ErrorCode::FILE_TOO_LARGE, message));
    }
    let upload = NewUpload {
        user: ctx.who.actor.user_id,
        room: b.room,
        name: b.name,
        size: b.size,
        media_type: b.media_type,
        sha256: b.sha256,
        now_ms: 0,
    };
    Ok(Admitted::Work(Work::Shared(Box::new(BeginJob { to: ctx.to, upload }))))
}

struct BeginJob {
    to: ReplyTo,
    upload: NewUpload,
}

impl SharedWork for BeginJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let upload = NewUpload { now_ms: now_ms(), ..self.upload };
        match store.create_upload(&upload) {
            Ok(record) => {
                vec![reply(self.to, state(&record, 0)), Effect::UploadOpened { to: self.to, upload: record }]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// Admits UPLOAD_RESUME.
pub fn resume(ctx: &mut Ctx<'_>, r: UploadResume) -> Result<Admitted, ErrorBody> {
    let job = ResumeJob { to: ctx.to, user: ctx.who.actor.user_id, upload: r.upload };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

struct ResumeJob {
    to: ReplyTo,
    user: chime_storage::UserId,
    upload: u64,
}

impl SharedWork for ResumeJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        match store.upload(self.upload, self.user) {
            // Where the upload stands is the file thread's to say, after the chunk writes already
            // queued for it (those of a connection that just died, say): the same order key puts
            // the question behind them.
            Ok(record) => {
                let order = record.id;
                let job = Box::new(OffsetJob { to: self.to, upload: record });
                vec![Effect::Then { to: self.to, work: Work::File(FileWork { order, chunk: false, job }) }]
            }
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// RESUME's second half, on the upload's file thread: what the staging file holds (after a
/// restart too: it is opened and its length read).
struct OffsetJob {
    to: ReplyTo,
    upload: UploadRecord,
}

impl FileJob for OffsetJob {
    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, thread: &mut FileThread) -> Vec<Effect> {
        // Nothing staged yet (or no more: a FINISH took it): 0, without creating a file that
        // nothing may ever remove.
        let path = thread.content.staging_path(&staging_name(self.upload.id));
        if !thread.uploads.contains_key(&self.upload.id) && !path.exists() {
            return vec![
                reply(self.to, state(&self.upload, 0)),
                Effect::UploadOpened { to: self.to, upload: self.upload },
            ];
        }
        match thread.staged(self.upload.id) {
            Ok(staged) => {
                let offset = staged.offset.min(self.upload.size);
                vec![
                    reply(self.to, state(&self.upload, offset)),
                    Effect::UploadOpened { to: self.to, upload: self.upload },
                ]
            }
            Err(e) => vec![refuse(self.to, io_error("opening an upload's staging file", &e))],
        }
    }
}

/// A chunk to write: built by the core once it checked that the upload is open on the connection
/// and the chunk fits in it.
pub fn write_job(to: ReplyTo, upload: &UploadRecord, offset: u64, data: Vec<u8>) -> Work {
    let job = WriteJob { to, upload: upload.id, size: upload.size, offset, data };
    Work::File(FileWork { order: upload.id, chunk: true, job: Box::new(job) })
}

/// FINISH of an open upload: verify on the file thread, then record on the room's shard.
pub fn finish_job(to: ReplyTo, actor: Actor, upload: UploadRecord, caption: String) -> Result<Work, ErrorBody> {
    if caption.len() > MAX_TEXT {
        return Err(invalid(format!("a caption is at most {MAX_TEXT} bytes")));
    }
    let order = upload.id;
    let job = FinishJob { to, actor, upload, caption };
    Ok(Work::File(FileWork { order, chunk: false, job: Box::new(job) }))
}

/// What a file thread keeps of an upload it is writing.
struct Staged {
    file: File,
    /// Bytes in the staging file.
    offset: u64,
    /// The hash of every byte so far, when this thread saw them all from the start; otherwise
    /// FINISH hashes the staging file.
    hasher: Option<sha2::Sha256>,
    /// When it was last used (for dropping the oldest).
    used: u64,
}

/// A file thread's state.
pub struct FileThread {
    content: Arc<Content>,
    uploads: HashMap<u64, Staged>,
    clock: u64,
}

impl FileThread {
    /// A thread's state over `content`.
    pub fn new(content: Arc<Content>) -> FileThread {
        FileThread { content, uploads: HashMap::new(), clock: 0 }
    }

    /// The open staging file of upload `id`, opened (and created) if this thread has not got it.
    fn staged(&mut self, id: u64) -> io::Result<&mut Staged> {
        self.clock += 1;
        let clock = self.clock;
        if !self.uploads.contains_key(&id) {
            if self.uploads.len() >= THREAD_UPLOADS {
                if let Some((&oldest, _)) = self.uploads.iter().min_by_key(|(_, s)| s.used) {
                    self.uploads.remove(&oldest);
                }
            }
            let path = self.content.staging_path(&staging_name(id));
            let file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
            let offset = file.metadata()?.len();
            let hasher = (offset == 0).then(sha2::Sha256::new);
            self.uploads.insert(id, Staged { file, offset, hasher, used: clock });
        }
        let staged = self.uploads.get_mut(&id).ok_or_else(|| io::Error::other("upload state vanished"))?;
        staged.used = clock;
        Ok(staged)
    }
}

struct WriteJob {
    to: ReplyTo,
    upload: u64,
    size: u64,
    offset: u64,
    data: Vec<u8>,
}

impl FileJob for WriteJob {
    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, thread: &mut FileThread) -> Vec<Effect> {
        let staged = match thread.staged(self.upload) {
            Ok(s) => s,
            Err(e) => return vec![refuse(self.to, io_error("opening an upload's staging file", &e))],
        };
        if self.offset != staged.offset {
            let message = format!("upload {} holds {} bytes; a chunk must start there", self.upload, staged.offset);
            return vec![refuse(self.to, ErrorBody::new(ErrorCode::OFFSET_MISMATCH, message))];
        }
        if staged.offset + self.data.len() as u64 > self.size {
            return vec![refuse(self.to, invalid("the chunk runs past the upload's size"))];
        }
        let written = staged.file.seek(SeekFrom::Start(self.offset)).and_then(|_| staged.file.write_all(&self.data));
        if let Err(e) = written {
            // What reached the file is unknown: forget the handle, the next chunk reads the length.
            thread.uploads.remove(&self.upload);
            return vec![refuse(self.to, io_error("writing an upload chunk", &e))];
        }
        staged.offset += self.data.len() as u64;
        if let Some(h) = staged.hasher.as_mut() {
            h.update(&self.data);
        }
        vec![reply(self.to, ServerFrame::ChunkStored(ChunkStored { upload: self.upload, offset: staged.offset }))]
    }
}

struct FinishJob {
    to: ReplyTo,
    actor: Actor,
    upload: UploadRecord,
    caption: String,
}

impl FinishJob {
    /// Checks the staged bytes against the announced size and hash and makes them durable.
    fn verify(&self, thread: &mut FileThread) -> Result<(), ErrorBody> {
        let id = self.upload.id;
        let staged = thread.staged(id).map_err(|e| io_error("opening an upload's staging file", &e))?;
        if staged.offset != self.upload.size {
            let message = format!("upload {id} holds {} of {} bytes", staged.offset, self.upload.size);
            return Err(ErrorBody::new(ErrorCode::UPLOAD_INCOMPLETE, message));
        }
        let digest: [u8; 32] = match staged.hasher.take() {
            Some(h) => h.finalize().into(),
            None => {
                staged.file.seek(SeekFrom::Start(0)).map_err(|e| io_error("reading a staged upload", &e))?;
                let (sha, _) = Sha256::of_reader((&staged.file).take(self.upload.size))
                    .map_err(|e| io_error("hashing a staged upload", &e))?;
                sha.0
            }
        };
        staged.file.sync_all().map_err(|e| io_error("syncing a staged upload", &e))?;
        thread.uploads.remove(&id);
        if digest != self.upload.sha256 {
            // The bytes are wrong somewhere: discard them, the client starts again from 0.
            let _ = fs::remove_file(thread.content.staging_path(&staging_name(id)));
            let message = format!(
                "upload {id} hashes to {}, not the {} announced; its bytes were discarded",
                hex::encode(digest),
                hex::encode(self.upload.sha256)
            );
            return Err(ErrorBody::new(ErrorCode::HASH_MISMATCH, message));
        }
        Ok(())
    }
}

impl FileJob for FinishJob {
    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, thread: &mut FileThread) -> Vec<Effect> {
        if let Err(e) = self.verify(thread) {
            return vec![refuse(self.to, e)];
        }
        let to = self.to;
        let job = ShareJob { to: self.to, actor: self.actor, upload: self.upload, caption: self.caption };
        vec![Effect::Then { to, work: Work::Room(Box::new(job)) }]
    }
}

/// A verified upload becomes content, a file record and its delta, on the room's shard.
struct ShareJob {
    to: ReplyTo,
    actor: Actor,
    upload: UploadRecord,
    caption: String,
}

impl RoomWork for ShareJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn room(&self) -> RoomId {
        self.upload.room
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn Store, settings: &Settings) -> Vec<Effect> {
        let content = match content_of(settings) {
            Ok(c) => c,
            Err(e) => return vec![refuse(self.to, e)],
        };
        let u = &self.upload;
        let sha = Sha256(u.sha256);
        // Held until the record is committed: a collection of the same content waits for it,
        // then finds the new reference.
        let _guard = content.lock(sha);
        let staged = content.staging_path(&staging_name(u.id));
        let fresh = match content.admit(&staged, sha, u.size) {
            Ok(fresh) => fresh,
            Err(e) => return vec![refuse(self.to, io_error("storing an upload", &e))],
        };
        let file = NewFile {
            upload: u.id,
            actor: (self.actor.user_id, self.actor.name.to_string()),
            room: u.room,
            name: u.name.clone(),
            size: u.size,
            media_type: u.media_type.clone(),
            sha256: u.sha256,
            caption: self.caption.clone(),
            now_ms: now_ms(),
        };
        match store.share_file(&file) {
            Ok((record, delta)) => {
                let stored = FileStored { file: record.id, room: u.room, seq: delta.seq, sha256: u.sha256 };
                let mut effects = vec![reply(self.to, ServerFrame::FileStored(stored))];
                effects.extend(Published::encode(u.room, &[wire_delta(delta)]).map(Effect::Publish));
                effects
            }
            Err(e) => {
                // Nothing refers to bytes this upload brought in: they go (under the lock still).
                // Content that was there already keeps its records.
                if fresh {
                    if let Err(e) = content.forget(sha) {
                        log::error!("dropping unrecorded content {}: {e}", sha.to_hex());
                    }
                }
                vec![refuse(self.to, store_error(&e))]
            }
        }
    }
}

/// Admits DOWNLOAD (the core checked the connection's download limit): the permission check and
/// the metadata on the shared queue.
pub fn download_job(to: ReplyTo, actor: Actor, d: chime_protocol::Download) -> Work {
    Work::Shared(Box::new(DownloadJob { to, actor, d }))
}

struct DownloadJob {
    to: ReplyTo,
    actor: Actor,
    d: chime_protocol::Download,
}

impl SharedWork for DownloadJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let f = match store.file_for(self.d.file, self.actor.user_id) {
            Ok(f) => f,
            Err(e) => return vec![refuse(self.to, store_error(&e))],
        };
        if self.d.offset > f.size {
            return vec![refuse(
                self.to,
                invalid(format!("offset {} is past the file's {} bytes", self.d.offset, f.size)),
            )];
        }
        let end = match self.d.length {
            0 => f.size,
            n => self.d.offset.saturating_add(n).min(f.size),
        };
        let meta = DownloadMeta {
            file: f.id,
            name: f.name,
            size: f.size,
            media_type: f.media_type,
            sha256: f.sha256,
            offset: self.d.offset,
            length: end - self.d.offset,
            window: DOWNLOAD_WINDOW * CHUNK_SIZE,
        };
        vec![
            reply(self.to, ServerFrame::DownloadMeta(Box::new(meta))),
            Effect::DownloadOpened { to: self.to, sha256: f.sha256, offset: self.d.offset, end },
        ]
    }
}

/// Reads `offset..offset+len` of a download, as `FILE_CHUNK` pushes, on a file thread.
pub fn read_job(to: ReplyTo, sha256: [u8; 32], offset: u64, len: u64) -> Work {
    // One download's reads go to one thread, in order.
    let order = (to.conn.gen << 20) ^ u64::from(to.request_id);
    Work::File(FileWork { order, chunk: false, job: Box::new(ReadJob { to, sha256, offset, len }) })
}

struct ReadJob {
    to: ReplyTo,
    sha256: [u8; 32],
    offset: u64,
    len: u64,
}

impl FileJob for ReadJob {
    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, thread: &mut FileThread) -> Vec<Effect> {
        let fail = |error: ErrorBody| vec![refuse(self.to, error), Effect::DownloadEnded { to: self.to }];
        let mut reader = match thread.content.reader(Sha256(self.sha256), self.offset) {
            Ok(r) => r,
            Err(e) if e.is_retryable() => return fail(ErrorBody::new(ErrorCode::UNAVAILABLE, e.to_string())),
            Err(e) => return fail(ErrorBody::new(ErrorCode::NOT_FOUND, e.to_string())),
        };
        let mut frames = Vec::new();
        let mut at = self.offset;
        let end = self.offset + self.len;
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        while at < end {
            let want = (end - at).min(u64::from(CHUNK_SIZE)) as usize;
            if let Err(e) = reader.read_exact(&mut buf[..want]) {
                // A copy fetched from a node can fail half-way when every node holding it has
                // gone: that is a retry later (the download resumes from its offset), not a fault.
                let unreachable = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<crate::content::ContentError>())
                    .is_some_and(crate::content::ContentError::is_retryable);
                if unreachable {
                    return fail(ErrorBody::new(ErrorCode::UNAVAILABLE, e.to_string()));
                }
                return fail(io_error("reading a download", &e));
            }
            let chunk = FileChunk { download: self.to.request_id, offset: at, data: buf[..want].to_vec() };
            match ServerFrame::FileChunk(chunk).encode(0) {
                Ok(frame) => frames.push(frame),
                Err(e) => return fail(ErrorBody::new(ErrorCode::INTERNAL, e.to_string())),
            }
            at += want as u64;
        }
        vec![Effect::FileChunks { to: self.to, frames, next: at }]
    }
}

/// Admits FORWARD: on the target room's shard (it appends there).
pub fn forward(ctx: &mut Ctx<'_>, f: Forward) -> Result<Admitted, ErrorBody> {
    if f.seq == chime_protocol::Seq::ZERO {
        return Err(invalid("seq 0 is no message"));
    }
    let job = ForwardJob { to: ctx.to, actor: ctx.who.actor.clone(), f };
    Ok(Admitted::Work(Work::Room(Box::new(job))))
}

struct ForwardJob {
    to: ReplyTo,
    actor: Actor,
    f: Forward,
}

impl RoomWork for ForwardJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    // The forward appends to the target room, so it runs on that room's shard.
    #[allow(clippy::misnamed_getters)]
    fn room(&self) -> RoomId {
        self.f.to_room
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn Store, settings: &Settings) -> Vec<Effect> {
        let f = &self.f;
        // A forwarded file adds a reference to its content: under the content's lock, so a
        // collection of it (its last record deleted meanwhile) either finishes first, and the
        // forward then finds no record to copy, or waits for the new reference.
        let sha = match store.deltas_after(f.room, chime_protocol::Seq(f.seq.get() - 1), 1) {
            Ok(d) => d
                .into_iter()
                .find(|d| d.seq == f.seq && d.kind == chime_storage::RecordKind::FILE_SHARED)
                .map(|d| chime_storage::files::decode_body(&d.body).0),
            Err(e) => return vec![refuse(self.to, store_error(&e))],
        };
        let content = settings.content.as_ref().map(|c| c.0.clone());
        let _guard = match (&content, sha) {
            (Some(c), Some(sha)) => Some(c.lock(Sha256(sha))),
            _ => None,
        };
        let actor = (self.actor.user_id, &*self.actor.name);
        match store.forward(actor, f.room, f.seq, f.to_room, now_ms()) {
            Ok(delta) => crate::work::appended(self.to, delta),
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}

/// Collects content that no file record refers to any more (after a delete of a shared file):
/// for each, under its lock, the row is dropped only if its count is still zero, and then the
/// bytes. A failure leaves the row for the next collection.
pub fn collect(store: &mut (impl SharedStore + ?Sized), settings: &Settings) {
    let Some(content) = settings.content.as_ref().map(|c| &c.0) else { return };
    let hashes = match store.unreferenced_contents(64) {
        Ok(h) => h,
        Err(e) => {
            log::warn!("listing unreferenced content: {e}");
            return;
        }
    };
    for sha in hashes {
        let sha = Sha256(sha);
        let _guard = content.lock(sha);
        match store.drop_content(&sha.0) {
            Ok(true) => {
                if let Err(e) = content.forget(sha) {
                    log::error!("content {} has no record but could not be removed: {e}", sha.to_hex());
                }
            }
            Ok(false) => {}
            Err(e) => log::warn!("collecting content {}: {e}", sha.to_hex()),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The race the content lock exists for: a collection of content whose last record was
    //! deleted, while an upload of the same bytes is being recorded. Two store connections, two
    //! threads, the interleavings forced with the lock itself.
    use super::*;
    use crate::node::Nodes;
    use chime_storage::{MessageAction, NewAction, RoomKind, Seq};
    use std::sync::mpsc;
    use std::time::Duration;

    struct Setup {
        _dir: tempfile::TempDir,
        url: String,
        content: Arc<Content>,
        settings: Settings,
        user: chime_storage::UserId,
        room: RoomId,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("chime.db").display());
        let content = Arc::new(
            Content::open(&dir.path().join("cache"), 1 << 30, Arc::new(Nodes::new(Vec::new(), 1))).expect("content"),
        );
        let settings = Settings {
            max_rooms_per_user: 10,
            session_limits: chime_storage::SessionLimits { idle_ms: 60_000, max_age_ms: 60_000 },
            content: Some(ContentRef(content.clone())),
            notifier: None,
        };
        let mut store = chime_storage::open(&url).expect("store");
        let user = store.create_user("ann", "x").expect("user").id;
        let room = store.create_room("r", RoomKind::GROUP, user, "ann", 1, 10).expect("room").0.id;
        Setup { _dir: dir, url, content, settings, user, room }
    }

    /// Stages `bytes` as upload `upload`'s file.
    fn stage(content: &Content, upload: u64, bytes: &[u8]) {
        fs::write(content.staging_path(&staging_name(upload)), bytes).expect("stage");
    }

    /// Records upload `id` the way [`ShareJob`] does, with the content lock already held.
    fn record(store: &mut dyn Store, s: &Setup, id: u64, sha: [u8; 32], size: u64) -> (u64, Seq) {
        let staged = s.content.staging_path(&staging_name(id));
        s.content.admit(&staged, Sha256(sha), size).expect("admit");
        let file = NewFile {
            upload: id,
            actor: (s.user, "ann".into()),
            room: s.room,
            name: "f".into(),
            size,
            media_type: String::new(),
            sha256: sha,
            caption: String::new(),
            now_ms: 1,
        };
        let (f, d) = store.share_file(&file).expect("share");
        (f.id, d.seq)
    }

    fn upload(store: &mut dyn Store, s: &Setup, sha: [u8; 32], size: u64) -> u64 {
        let u = NewUpload {
            user: s.user,
            room: s.room,
            name: "f".into(),
            size,
            media_type: String::new(),
            sha256: sha,
            now_ms: 1,
        };
        store.create_upload(&u).expect("upload").id
    }

    fn delete(store: &mut dyn Store, s: &Setup, seq: Seq) {
        let a = NewAction {
            room: s.room,
            target: seq,
            actor: s.user,
            actor_name: "ann".into(),
            action: MessageAction::Delete,
            idempotency_key: String::new(),
            now_ms: 2,
        };
        store.act(&a).expect("delete");
    }

    /// `bytes` uploaded, shared in the room and the message deleted: their content is stored
    /// but unreferenced. Returns the store the steps ran on.
    fn shared_then_deleted(s: &Setup, sha: Sha256, bytes: &[u8]) -> Box<dyn Store> {
        let mut store = chime_storage::open(&s.url).expect("store");
        let first = upload(&mut *store, s, sha.0, bytes.len() as u64);
        stage(&s.content, first, bytes);
        let (_, seq) = {
            let _g = s.content.lock(sha);
            record(&mut *store, s, first, sha.0, bytes.len() as u64)
        };
        delete(&mut *store, s, seq);
        store
    }

    #[test]
    fn a_collection_waits_for_an_upload_of_the_same_bytes_and_keeps_them() {
        let s = setup();
        let bytes = b"the same bytes".to_vec();
        let sha = Sha256::digest(&bytes);
        // The last record goes: the content is unreferenced, not yet collected.
        let mut store = shared_then_deleted(&s, sha, &bytes);
        assert!(s.content.has(sha));
        // A second upload of the same bytes is being recorded (it holds the lock) when a
        // collection starts on another thread: the collection must wait, then keep the bytes.
        let second = upload(&mut *store, &s, sha.0, bytes.len() as u64);
        stage(&s.content, second, &bytes);
        let guard = s.content.lock(sha);
        let (tx, rx) = mpsc::channel();
        let collector = {
            let (url, settings) = (s.url.clone(), s.settings.clone());
            std::thread::spawn(move || {
                let mut other = chime_storage::open(&url).expect("store");
                collect(&mut *other, &settings);
                tx.send(()).expect("send");
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "the collection waits for the lock");
        // Admitting finds the bytes still there (dedupe) and takes a reference under the lock.
        record(&mut *store, &s, second, sha.0, bytes.len() as u64);
        drop(guard);
        rx.recv_timeout(Duration::from_secs(10)).expect("the collection finishes");
        collector.join().expect("collector");
        assert!(s.content.has(sha), "bytes a record refers to were kept");
        assert!(store.unreferenced_contents(10).expect("list").is_empty());
    }

    #[test]
    fn an_upload_after_a_collection_stores_the_bytes_again() {
        let s = setup();
        let bytes = b"collected, then uploaded again".to_vec();
        let sha = Sha256::digest(&bytes);
        let mut store = shared_then_deleted(&s, sha, &bytes);
        collect(&mut *store, &s.settings);
        assert!(!s.content.has(sha), "unreferenced content is collected");
        let second = upload(&mut *store, &s, sha.0, bytes.len() as u64);
        stage(&s.content, second, &bytes);
        let (file, _) = {
            let _g = s.content.lock(sha);
            record(&mut *store, &s, second, sha.0, bytes.len() as u64)
        };
        assert!(s.content.has(sha), "the new upload brought the bytes back");
        let mut back = Vec::new();
        s.content.reader(sha, 0).expect("reader").read_to_end(&mut back).expect("read");
        assert_eq!(back, bytes);
        assert_eq!(store.file_for(file, s.user).expect("file").sha256, sha.0);
    }
}
