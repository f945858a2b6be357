//! The core's part of file transfers: which uploads a connection may send chunks for, its upload
//! window, and the state of its downloads (the window of chunks in flight that the client opens
//! with `DOWNLOAD_ACK`s). Bytes never pass through here except as encoded frames the file
//! threads made; the core only decides when to ask for more and queues them in the bulk class.
//!
//! Upload flow control: each chunk is a file job; while a connection has [`UPLOAD_WINDOW`] of them
//! unfinished the loop stops decoding its frames ([`Core::flow`]), so a client that ignores the
//! window is slowed by TCP rather than buffered. Download flow control: at most
//! [`DOWNLOAD_WINDOW`] chunks beyond the client's last acknowledged offset are read and queued,
//! one read job per download at a time.

use super::{error, Core, Io, Key};
use crate::handlers::files::{self, CHUNK_SIZE, DOWNLOAD_WINDOW, MAX_DOWNLOADS, MAX_OPEN_UPLOADS};
use crate::transport::Class;
use crate::work::ReplyTo;
use bytes::Bytes;
use chime_protocol::{ClientFrame, ErrorCode};
use chime_storage::UploadRecord;

pub use crate::handlers::files::UPLOAD_WINDOW;

/// A download being streamed on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Download {
    /// The DOWNLOAD's request id (named by its chunks and acks).
    rid: u32,
    /// The content.
    sha256: [u8; 32],
    /// Where the next read starts.
    next: u64,
    /// Where the range ends (exclusive).
    end: u64,
    /// What the client acknowledged receiving.
    acked: u64,
    /// Bytes of the read job out (0: none).
    reading: u64,
}

/// A connection's file transfer state, allocated when it first transfers a file: most
/// connections never do, and an idle connection's memory is the daemon's budget (this is a word
/// in every connection's link instead of the state's 56 bytes).
#[derive(Debug, Default)]
pub(super) struct Transfers(Option<Box<TransferState>>);

/// What [`Transfers`] holds once a connection has transferred a file.
#[derive(Debug, Default)]
pub(super) struct TransferState {
    /// Uploads the connection began or resumed: it may send their chunks and finish them.
    pub(super) uploads: Vec<UploadRecord>,
    /// Downloads streaming.
    pub(super) downloads: Vec<Download>,
    /// Chunk writes with the file threads.
    pub(super) chunks: u32,
}

/// The state of a connection that has transferred nothing.
static NONE: TransferState = TransferState { uploads: Vec::new(), downloads: Vec::new(), chunks: 0 };

impl std::ops::Deref for Transfers {
    type Target = TransferState;

    fn deref(&self) -> &TransferState {
        self.0.as_deref().unwrap_or(&NONE)
    }
}

impl std::ops::DerefMut for Transfers {
    fn deref_mut(&mut self) -> &mut TransferState {
        self.0.get_or_insert_with(Box::default)
    }
}

impl TransferState {
    /// Whether the connection must wait for chunk writes before more frames are decoded.
    pub(super) fn window_full(&self) -> bool {
        self.chunks >= UPLOAD_WINDOW
    }
}

impl Core {
    /// The file frames that need the connection's transfer state; any other frame is handed back.
    pub(super) fn file_request(
        &mut self,
        io: &mut dyn Io,
        key: Key,
        rid: u32,
        frame: ClientFrame,
    ) -> Option<ClientFrame> {
        let link = self.link(key)?;
        let to = ReplyTo { conn: link.id, request_id: rid };
        let actor = link.who()?.actor.clone();
        match frame {
            ClientFrame::UploadChunk(c) => {
                let Some(upload) = link.transfers.uploads.iter().find(|u| u.id == c.upload).cloned() else {
                    return not_open(io, key, rid, c.upload);
                };
                if c.data.is_empty() || c.data.len() > CHUNK_SIZE as usize {
                    error(io, key, rid, ErrorCode::INVALID_ARGUMENT, &format!("a chunk is 1 to {CHUNK_SIZE} bytes"));
                    return None;
                }
                if c.offset.checked_add(c.data.len() as u64).is_none_or(|end| end > upload.size) {
                    error(io, key, rid, ErrorCode::INVALID_ARGUMENT, "the chunk runs past the upload's size");
                    return None;
                }
                self.submit(io, key, rid, files::write_job(to, &upload, c.offset, c.data), false);
            }
            ClientFrame::UploadFinish(f) => {
                let Some(at) = link.transfers.uploads.iter().position(|u| u.id == f.upload) else {
                    return not_open(io, key, rid, f.upload);
                };
                let upload = link.transfers.uploads.remove(at);
                match files::finish_job(to, actor, upload, f.caption) {
                    Ok(work) => self.submit(io, key, rid, work, false),
                    Err(e) => error(io, key, rid, e.code, &e.message),
                }
            }
            ClientFrame::Download(d) => {
                if link.transfers.downloads.len() >= MAX_DOWNLOADS {
                    let message = format!("at most {MAX_DOWNLOADS} downloads at once per connection");
                    error(io, key, rid, ErrorCode::LIMIT_REACHED, &message);
                    return None;
                }
                self.submit(io, key, rid, files::download_job(to, actor, d), false);
            }
            ClientFrame::DownloadAck(a) => {
                if let Some(d) = link.transfers.downloads.iter_mut().find(|d| d.rid == a.download) {
                    d.acked = d.acked.max(a.received.min(d.next));
                }
                self.pump(io, key);
            }
            other => return Some(other),
        }
        None
    }

    /// The connection may send chunks of `upload`.
    pub(super) fn upload_opened(&mut self, to: ReplyTo, upload: UploadRecord) {
        let Some(link) = self.link_of(to.conn) else { return };
        let uploads = &mut link.transfers.uploads;
        uploads.retain(|u| u.id != upload.id);
        if uploads.len() >= MAX_OPEN_UPLOADS {
            uploads.remove(0);
        }
        uploads.push(upload);
    }

    /// A chunk write finished: its window slot is free.
    pub(super) fn chunk_done(&mut self, to: ReplyTo) {
        if let Some(link) = self.link_of(to.conn) {
            link.transfers.chunks = link.transfers.chunks.saturating_sub(1);
        }
    }

    /// A download's metadata went out: stream its range.
    pub(super) fn download_opened(&mut self, io: &mut dyn Io, to: ReplyTo, sha256: [u8; 32], offset: u64, end: u64) {
        let Some(link) = self.link_of(to.conn) else { return };
        if offset < end {
            let rid = to.request_id;
            link.transfers.downloads.retain(|d| d.rid != rid);
            link.transfers.downloads.push(Download { rid, sha256, next: offset, end, acked: offset, reading: 0 });
        }
        self.pump(io, to.conn.key);
    }

    /// Chunks were read: they go out in the bulk class, and the next read starts if the window
    /// allows.
    pub(super) fn file_chunks(&mut self, io: &mut dyn Io, to: ReplyTo, frames: Vec<Bytes>, next: u64) {
        let key = to.conn.key;
        let Some(link) = self.link_of(to.conn) else { return };
        let Some(at) = link.transfers.downloads.iter().position(|d| d.rid == to.request_id) else { return };
        // To the back of the line: the connection's other downloads get the next reads first.
        let mut d = link.transfers.downloads.remove(at);
        d.reading = 0;
        d.next = next;
        if d.next < d.end {
            link.transfers.downloads.push(d);
        }
        for frame in frames {
            io.send(key, frame, Class::Bulk);
        }
        self.pump(io, key);
    }

    /// A download failed (its ERROR is on its way).
    pub(super) fn download_ended(&mut self, to: ReplyTo) {
        if let Some(link) = self.link_of(to.conn) {
            link.transfers.downloads.retain(|d| d.rid != to.request_id);
        }
    }

    /// Starts a read for every download of the connection whose window has room and that has no
    /// read out. Besides each download's window, what the connection has queued and what its reads
    /// will bring stay within half its outbound limit (as for SYNC pages), so several downloads
    /// never push its queue over the limit; at least one chunk goes when nothing is queued.
    pub(super) fn pump(&mut self, io: &mut dyn Io, key: Key) {
        let queued = io.queued(key) as u64;
        let half = (self.config.max_outbound_bytes / 2) as u64;
        let Some(link) = self.link(key) else { return };
        let conn = link.id;
        let chunk = u64::from(CHUNK_SIZE);
        let window = u64::from(DOWNLOAD_WINDOW) * chunk;
        let out: u64 = link.transfers.downloads.iter().map(|d| d.reading).sum();
        let mut budget = half.saturating_sub(queued + out);
        if queued + out == 0 {
            budget = budget.max(chunk);
        }
        let mut reads = Vec::new();
        for d in link.transfers.downloads.iter_mut().filter(|d| d.reading == 0 && d.next < d.end) {
            let room = window.saturating_sub(d.next - d.acked).min(budget);
            // Whole chunks only, so chunk boundaries stay where the client expects them.
            let len = (room / chunk * chunk).min(d.end - d.next);
            if len > 0 {
                d.reading = len;
                budget -= len.min(budget);
                reads.push(files::read_job(ReplyTo { conn, request_id: d.rid }, d.sha256, d.next, len));
            }
        }
        for work in reads {
            let rid = work.reply_to().map_or(0, |t| t.request_id);
            if io.submit(work) {
                if let Some(link) = self.link(key) {
                    link.inflight += 1;
                }
            } else {
                if let Some(link) = self.link(key) {
                    link.transfers.downloads.retain(|d| d.rid != rid);
                }
                error(io, key, rid, ErrorCode::OVERLOADED, "server busy; resume the download shortly");
            }
        }
    }
}

impl Core {
    /// Once a second: downloads held back by a full queue (not by their window) go on once it
    /// drained, even if no acknowledgement comes to trigger them.
    pub(super) fn pump_all(&mut self, io: &mut dyn Io) {
        let keys: Vec<Key> = (0..self.links.len())
            .filter(|&k| self.links[k].as_ref().is_some_and(|l| !l.transfers.downloads.is_empty()))
            .collect();
        for key in keys {
            self.pump(io, key);
        }
    }
}

fn not_open(io: &mut dyn Io, key: Key, rid: u32, upload: u64) -> Option<ClientFrame> {
    let message = format!("upload {upload} is not open on this connection; UPLOAD_RESUME it first");
    error(io, key, rid, ErrorCode::NOT_FOUND, &message);
    None
}
