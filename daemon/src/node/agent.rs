//! `chimed node --root DIR`: the storage agent. The daemon starts it on a node through `ssh`; it
//! serves the [`proto`](super::proto) protocol on stdin and stdout over a [`Store`].
//!
//! Threads, and why:
//! - the **reader** (the calling thread) reads frames, answers HELLO, refuses what is malformed
//!   and hands everything else on. It never touches a file, so a STAT that arrives behind the
//!   chunks of a 100 MB PUT is handed on at once instead of waiting for a disk;
//! - the **writer** owns stdout: the other threads send it whole encoded frames through one bounded
//!   channel, so frames never interleave; it flushes whenever it has nothing queued;
//! - one **request worker** answers the small requests (STAT, DELETE, SPACE, LIST) in order;
//! - one **transfer thread** per open PUT, GET or VERIFY (at most [`MAX_TRANSFERS`]), fed through
//!   its own inbox, so one slow disk read or fsync delays only its own transfer.
//!
//! Memory is bounded whatever the client sends: a frame is at most [`proto::MAX_FRAME`] bytes;
//! transfers are credit-based both ways ([`WINDOW`] chunks), and the reader refuses a chunk the
//! agent gave no credit for (`FLOW`) rather than queue it, so a PUT's inbox holds at most a window;
//! the writer's and the request worker's queues are bounded and, when full, block the reader,
//! which pushes back on the client through the pipe. Files are streamed, never held whole.
//!
//! stdout carries only frames; logs go to stderr, which ssh hands to the daemon. The session ends
//! at the end of stdin: open transfers are cancelled (an unfinished upload's temp file is removed),
//! queued replies are flushed, and [`serve`] returns. A session-fatal error (no HELLO first, a
//! length over the maximum, id 0 on a request) is answered with ERROR on id 0 and ends it too.

use super::proto::{
    self, ErrorCode, FrameType, ReadError, Reply, Request, Sha256, WireError, MAX_CHUNK, MAX_LIST_PAGE, MAX_TRANSFERS,
    VERSION, WINDOW,
};
use super::store::{Check, PutError, Store};
use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError, TrySendError};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Frames queued for stdout at most (about 16 MiB of full chunks).
const WRITER_QUEUE: usize = 64;

/// Small requests queued for the request worker at most.
const REQUEST_QUEUE: usize = 64;

/// How often a running VERIFY says so, to keep the client's reply timeout from firing.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A transfer's flag: still running.
const RUNNING: u8 = 0;
/// A transfer's flag: cancelled (by the client, by a refusal, or by the end of the session); it
/// leaves without another frame.
const CANCELLED: u8 = 1;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The root could not be created or opened.
    #[error("cannot open the object store at {}: {error}", path.display())]
    Store {
        /// The root given.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The client broke the protocol in a way that ends the session (answered with ERROR on id 0).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// stdin or stdout could not be used.
    #[error("{0}")]
    Io(io::Error),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
}

/// Runs the agent on this process's stdin and stdout until stdin ends.
pub fn run(root: &Path) -> Result<(), AgentError> {
    let store = Store::open(root).map_err(|error| AgentError::Store { path: root.to_path_buf(), error })?;
    // Our own descriptors for the two pipes: std's Stdout is line-buffered (it would flush at
    // every newline byte inside a chunk) and its lock cannot move to the writer thread.
    let input = io::stdin().as_fd().try_clone_to_owned().map(File::from).map_err(AgentError::Io)?;
    let output = io::stdout().as_fd().try_clone_to_owned().map(File::from).map_err(AgentError::Io)?;
    log::debug!("serving the object store at {}", store.root().display());
    serve(store, input, output)
}

/// Serves one session over `input` and `output` (stdin and stdout, or a socket in tests) until
/// `input` ends or the client breaks the protocol beyond repair.
pub fn serve(store: Store, input: impl Read, output: impl Write + Send + 'static) -> Result<(), AgentError> {
    let store = Arc::new(store);
    let (out, frames) = bounded::<Vec<u8>>(WRITER_QUEUE);
    let writer = spawn("node-writer", move || write_frames(&frames, output))?;
    let (requests, queued) = bounded(REQUEST_QUEUE);
    let worker = {
        let (store, out) = (store.clone(), out.clone());
        spawn("node-requests", move || answer_requests(&store, &queued, &out))?
    };
    let mut session =
        Session { store, out, requests, transfers: Arc::new(Mutex::new(HashMap::new())), refused: Vec::new() };
    let result = session.read_frames(BufReader::with_capacity(64 << 10, input));
    // Everything below only waits for threads that are about to end: transfers are cancelled,
    // and the writer ends once every sender of frames is gone.
    session.close();
    join(worker);
    join(writer);
    result
}

/// The reader's state.
struct Session {
    /// The object store.
    store: Arc<Store>,
    /// Frames for the writer.
    out: Sender<Vec<u8>>,
    /// Small requests for the request worker.
    requests: Sender<(u32, Request)>,
    /// Open transfers by id; a transfer thread removes itself when it ends.
    transfers: Table,
    /// Threads of transfers ended by a refusal, joined when the session closes.
    refused: Vec<JoinHandle<()>>,
}

/// Open transfers by id.
type Table = Arc<Mutex<HashMap<u32, Handle>>>;

/// The reader's handle on an open transfer.
struct Handle {
    /// PUT, GET or VERIFY: which client frames belong to it.
    kind: FrameType,
    /// Messages for its thread.
    inbox: Sender<Inbox>,
    /// [`RUNNING`] or [`CANCELLED`]; also identifies this transfer (see [`Transfer::leave`]).
    flag: Arc<AtomicU8>,
    /// Chunks of credit the PUT's thread has granted so far.
    granted: Arc<AtomicU64>,
    /// Chunks of data the client has sent so far.
    received: u64,
    /// The thread.
    thread: JoinHandle<()>,
}

/// What the reader hands a transfer thread.
enum Inbox {
    /// A PUT chunk.
    Data(Vec<u8>),
    /// The PUT's data is complete.
    End,
    /// More credit for a GET.
    Credit(u32),
    /// Stop without another frame.
    Cancel,
}

impl Session {
    fn read_frames(&mut self, mut input: impl Read) -> Result<(), AgentError> {
        let mut welcomed = false;
        loop {
            let raw = match proto::read_frame(&mut input) {
                Ok(Some(raw)) => raw,
                Ok(None) => return Ok(()),
                Err(ReadError::Io(e)) => return Err(AgentError::Io(e)),
                Err(ReadError::Truncated) => return Err(AgentError::Protocol("stdin ended inside a frame".into())),
                Err(e @ ReadError::TooLarge(_)) => return Err(self.fatal(ErrorCode::TOO_LARGE, e.to_string())),
                Err(e @ ReadError::TooShort(_)) => return Err(self.fatal(ErrorCode::MALFORMED, e.to_string())),
            };
            let id = raw.id;
            let request = Request::decode(raw);
            if !welcomed {
                match request {
                    Ok(Request::Hello { version: VERSION }) => self.welcome(),
                    Ok(Request::Hello { version }) => {
                        let message = format!("this agent speaks protocol version {VERSION}, not {version}");
                        return Err(self.fatal(ErrorCode::VERSION, message));
                    }
                    Ok(_) | Err(_) => {
                        return Err(self.fatal(ErrorCode::HANDSHAKE, "the session must start with HELLO".into()))
                    }
                }
                welcomed = true;
                continue;
            }
            if id == 0 {
                return Err(self.fatal(ErrorCode::MALFORMED, "id 0 is the session's own; requests need another".into()));
            }
            match request {
                Ok(request) => self.dispatch(id, request),
                Err(e) => self.refuse(id, e.code(), e.to_string()),
            }
        }
    }

    fn welcome(&self) {
        let welcome = proto::Welcome {
            version: VERSION,
            max_chunk: MAX_CHUNK as u32,
            window: WINDOW,
            max_transfers: MAX_TRANSFERS,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            host: rustix::system::uname().nodename().to_string_lossy().into_owned(),
            root: self.store.root().display().to_string(),
        };
        self.send(Reply::Welcome(welcome).encode(0));
    }

    fn dispatch(&mut self, id: u32, request: Request) {
        match request {
            Request::Hello { .. } => self.refuse(id, ErrorCode::HANDSHAKE, "HELLO was already sent".into()),
            Request::Put { .. } | Request::Get { .. } | Request::Verify(_) => self.start(id, request),
            Request::Data(chunk) => self.route(id, FrameType::PUT, Inbox::Data(chunk)),
            Request::End => self.route(id, FrameType::PUT, Inbox::End),
            Request::Credit(n) => self.route(id, FrameType::GET, Inbox::Credit(n)),
            Request::Cancel => self.cancel(id),
            Request::Stat(_) | Request::Delete(_) | Request::Space | Request::List { .. } => {
                // Blocks while the worker is REQUEST_QUEUE requests behind: back-pressure.
                let _ = self.requests.send((id, request));
            }
        }
    }

    /// Opens a transfer on its own thread.
    fn start(&mut self, id: u32, request: Request) {
        let kind = request.frame_type();
        let mut transfers = lock(&self.transfers);
        if transfers.contains_key(&id) {
            drop(transfers);
            return self.refuse(id, ErrorCode::DUPLICATE_ID, format!("transfer {id} is already open"));
        }
        if transfers.len() >= MAX_TRANSFERS as usize {
            drop(transfers);
            let message = format!("{MAX_TRANSFERS} transfers are already open on this session");
            return self.refuse(id, ErrorCode::BUSY, message);
        }
        // A PUT's inbox holds at most its window of chunks plus END and CANCEL (the reader refuses
        // chunks beyond the credit granted); a GET's at most a window of CREDITs.
        let (inbox, messages) = bounded(WINDOW as usize + 4);
        let flag = Arc::new(AtomicU8::new(RUNNING));
        let granted = Arc::new(AtomicU64::new(0));
        let transfer = Transfer {
            id,
            store: self.store.clone(),
            out: self.out.clone(),
            inbox: messages,
            flag: flag.clone(),
            granted: granted.clone(),
            table: self.transfers.clone(),
        };
        // The table stays locked until the handle is in it, so the thread cannot try to leave
        // before it has arrived.
        match thread::Builder::new().name(format!("node-transfer-{id}")).spawn(move || transfer.run(request)) {
            Ok(thread) => {
                transfers.insert(id, Handle { kind, inbox, flag, granted, received: 0, thread });
            }
            Err(e) => {
                drop(transfers);
                self.refuse(id, ErrorCode::IO, format!("cannot start a thread: {e}"));
            }
        }
    }

    /// Hands a client frame to its transfer. Frames for an id that is not open are dropped: they
    /// are the normal tail of a transfer that just ended (chunks already in flight when the agent
    /// refused it, credit for a GET that has just sent its last chunk).
    fn route(&mut self, id: u32, kind: FrameType, message: Inbox) {
        let mut transfers = lock(&self.transfers);
        let Some(handle) = transfers.get_mut(&id) else {
            log::debug!("dropped a frame for transfer {id}, which is not open");
            return;
        };
        let violation = if handle.kind != kind {
            Some(format!("{} does not belong to a {} transfer", frame_name(&message), handle.kind))
        } else if matches!(message, Inbox::Data(_)) {
            handle.received += 1;
            let granted = handle.granted.load(Ordering::Acquire);
            (handle.received > granted).then(|| format!("chunk {} sent with credit for {granted}", handle.received))
        } else {
            None
        };
        let violation = violation.or_else(|| match handle.inbox.try_send(message) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => None,
            Err(TrySendError::Full(_)) => Some("more CREDIT than the window allows".into()),
        });
        drop(transfers);
        if let Some(why) = violation {
            self.refuse(id, ErrorCode::FLOW, why);
        }
    }

    fn cancel(&mut self, id: u32) {
        if let Some(handle) = lock(&self.transfers).remove(&id) {
            stop(&handle);
            self.refused.push(handle.thread);
        }
    }

    /// Answers ERROR on `id`. An ERROR ends whatever `id` was on both sides, so an open transfer
    /// of that id is cancelled first.
    fn refuse(&mut self, id: u32, code: ErrorCode, message: String) {
        log::debug!("refused {id}: {code}: {message}");
        self.cancel(id);
        self.send(Reply::Error(WireError { code, message }).encode(id));
    }

    /// Answers ERROR on id 0 (which ends the session) and returns the error to end it with.
    fn fatal(&self, code: ErrorCode, message: String) -> AgentError {
        log::warn!("ending the session: {code}: {message}");
        self.send(Reply::Error(WireError { code, message: message.clone() }).encode(0));
        AgentError::Protocol(message)
    }

    fn send(&self, frame: Vec<u8>) {
        // The writer is gone only when stdout is; stdin will end next.
        let _ = self.out.send(frame);
    }

    /// Cancels every open transfer and waits for their threads (which remove unfinished uploads).
    fn close(self) {
        let Session { transfers, refused, requests, out, .. } = self;
        drop((requests, out));
        let open: Vec<Handle> = lock(&transfers).drain().map(|(_, handle)| handle).collect();
        for handle in &open {
            stop(handle);
        }
        for Handle { inbox, thread, .. } in open {
            drop(inbox);
            join(thread);
        }
        refused.into_iter().for_each(join);
    }
}

/// Tells a transfer's thread to stop. If its inbox is full, it has messages to wake up to and
/// sees the flag after the next one.
fn stop(handle: &Handle) {
    handle.flag.store(CANCELLED, Ordering::Release);
    let _ = handle.inbox.try_send(Inbox::Cancel);
}

fn frame_name(message: &Inbox) -> &'static str {
    match message {
        Inbox::Data(_) => "DATA",
        Inbox::End => "END",
        Inbox::Credit(_) => "CREDIT",
        Inbox::Cancel => "CANCEL",
    }
}

/// One open transfer, on its own thread.
struct Transfer {
    id: u32,
    store: Arc<Store>,
    out: Sender<Vec<u8>>,
    inbox: Receiver<Inbox>,
    flag: Arc<AtomicU8>,
    granted: Arc<AtomicU64>,
    table: Table,
}

/// How far a VERIFY has got.
struct Progress {
    checked: u64,
    bad: u64,
    bytes: u64,
    reported: Instant,
}

impl Transfer {
    fn run(self, request: Request) {
        match request {
            Request::Put { sha256, size } => self.put(sha256, size),
            Request::Get { sha256, offset, length } => self.get(sha256, offset, length),
            Request::Verify(one) => self.verify(one),
            // `Session::start` is given only the three above.
            _ => self.fail(ErrorCode::MALFORMED, "not a transfer".into()),
        }
    }

    fn put(&self, sha256: Sha256, size: u64) {
        match self.store.stat(&sha256) {
            // Same name, same size: the same content unless the disk damaged it, which VERIFY
            // finds; the client need not send a byte.
            Ok(Some(stored)) if stored == size => return self.finish(Reply::Stored { existed: true }),
            Ok(_) => {}
            Err(e) => return self.io_failure("looking up", &sha256, &e),
        }
        if let Ok((free, _)) = self.store.filesystem_space() {
            if size > free {
                let message = format!("{size} bytes do not fit in the {free} bytes free");
                return self.fail(ErrorCode::NO_SPACE, message);
            }
        }
        let mut upload = match self.store.begin_put(sha256, size) {
            Ok(upload) => upload,
            Err(e) => return self.io_failure("creating the upload of", &sha256, &e),
        };
        self.grant(WINDOW);
        while let Some(message) = self.next() {
            match message {
                Inbox::Data(chunk) => {
                    if let Err(e) = upload.write(&chunk) {
                        return self.put_failed(&sha256, e);
                    }
                    self.grant(1);
                }
                Inbox::End => {
                    return match upload.finish() {
                        Ok(()) => self.finish(Reply::Stored { existed: false }),
                        Err(e) => self.put_failed(&sha256, e),
                    };
                }
                // The reader routes only DATA and END to a PUT; CANCEL is taken by `next`.
                Inbox::Credit(_) | Inbox::Cancel => return self.leave(),
            }
        }
        // Cancelled: dropping `upload` removes its temp file.
    }

    fn grant(&self, chunks: u32) {
        // Counted before it is sent, so the reader never sees a chunk before its credit.
        self.granted.fetch_add(u64::from(chunks), Ordering::AcqRel);
        self.send(Reply::Credit(chunks).encode(self.id));
    }

    fn put_failed(&self, sha256: &Sha256, e: PutError) {
        match e {
            PutError::Size { .. } => self.fail(ErrorCode::SIZE, e.to_string()),
            PutError::Mismatch { .. } => self.fail(ErrorCode::MISMATCH, e.to_string()),
            PutError::Io(e) => self.io_failure("storing", sha256, &e),
        }
    }

    fn get(&self, sha256: Sha256, offset: u64, length: u64) {
        let (mut file, size) = match self.store.open_object(&sha256) {
            Ok(Some(found)) => found,
            Ok(None) => return self.fail(ErrorCode::NOT_FOUND, format!("no object {sha256}")),
            Err(e) => return self.io_failure("opening", &sha256, &e),
        };
        if offset > size {
            let message = format!("offset {offset} is past the end of the {size}-byte object");
            return self.fail(ErrorCode::RANGE, message);
        }
        let length = length.min(size - offset);
        if let Err(e) = file.seek(SeekFrom::Start(offset)) {
            return self.io_failure("seeking in", &sha256, &e);
        }
        self.send(Reply::Opened { size, length }.encode(self.id));
        let mut credit = 0u32;
        let mut left = length;
        while left > 0 {
            if !self.gather_credit(&mut credit) {
                return;
            }
            let want = left.min(MAX_CHUNK as u64) as usize;
            match proto::data_frame(FrameType::AGENT_DATA, self.id, want, |buf| proto::read_up_to(&mut file, buf)) {
                Ok(Some(frame)) => {
                    left -= (frame.len() - proto::HEADER_LEN) as u64;
                    credit -= 1;
                    self.send(frame);
                }
                Ok(None) => {
                    let message = format!("object {sha256} ended {left} bytes early (was it truncated?)");
                    return self.fail(ErrorCode::IO, message);
                }
                Err(e) => return self.io_failure("reading", &sha256, &e),
            }
        }
        self.finish(Reply::End);
    }

    /// Takes the CREDIT that has arrived, waiting for some only when there is none left.
    /// `false`: the transfer is over (cancelled, or refused here for breaking the window).
    fn gather_credit(&self, credit: &mut u32) -> bool {
        loop {
            let message = if *credit == 0 {
                self.inbox.recv().ok()
            } else {
                match self.inbox.try_recv() {
                    Ok(message) => Some(message),
                    Err(TryRecvError::Empty) => return self.still_running(),
                    Err(TryRecvError::Disconnected) => None,
                }
            };
            if !self.still_running() {
                return false;
            }
            match message {
                Some(Inbox::Credit(n)) => {
                    *credit = credit.saturating_add(n);
                    if *credit > WINDOW {
                        let message = format!("{credit} chunks of credit outstanding, the window is {WINDOW}");
                        self.fail(ErrorCode::FLOW, message);
                        return false;
                    }
                }
                // The reader routes only CREDIT to a GET.
                None | Some(Inbox::Cancel | Inbox::Data(_) | Inbox::End) => {
                    self.leave();
                    return false;
                }
            }
        }
    }

    fn verify(&self, one: Option<Sha256>) {
        let mut progress = Progress { checked: 0, bad: 0, bytes: 0, reported: Instant::now() };
        if let Some(sha256) = one {
            match self.check(&sha256, &mut progress) {
                None => {}
                Some(Check::Missing) => self.fail(ErrorCode::NOT_FOUND, format!("no object {sha256}")),
                Some(_) => self.finish(Reply::Verified { checked: progress.checked, bad: progress.bad }),
            }
            return;
        }
        let mut stopped = false;
        let walked = self.store.for_each_object(|sha256| {
            stopped = !self.keep_going(&mut progress) || self.check(&sha256, &mut progress).is_none();
            !stopped
        });
        if stopped {
            return;
        }
        match walked {
            Ok(()) => self.finish(Reply::Verified { checked: progress.checked, bad: progress.bad }),
            Err(e) => {
                log::warn!("listing the objects to verify: {e}");
                self.fail(ErrorCode::IO, format!("listing the objects: {e}"));
            }
        }
    }

    /// Re-hashes one object, reporting it if bad; `None` when the transfer was stopped.
    fn check(&self, sha256: &Sha256, progress: &mut Progress) -> Option<Check> {
        let before = progress.bytes;
        let check = self.store.check(sha256, &mut |hashed| {
            progress.bytes = before + hashed;
            self.keep_going(progress)
        });
        match &check {
            Check::Stopped => return None,
            Check::Missing => {} // deleted while VERIFY walked past it
            Check::Good { .. } => progress.checked += 1,
            Check::Bad(bad) => {
                log::warn!("object {} is bad: {:?}: {}", bad.sha256, bad.kind, bad.detail);
                progress.checked += 1;
                progress.bad += 1;
                self.send(Reply::Bad(bad.clone()).encode(self.id));
            }
        }
        Some(check)
    }

    /// Between two steps of a VERIFY: stops when cancelled, reports progress once a second.
    fn keep_going(&self, progress: &mut Progress) -> bool {
        match self.inbox.try_recv() {
            Err(TryRecvError::Empty) => {}
            // The reader routes nothing but CANCEL to a VERIFY.
            Ok(_) | Err(TryRecvError::Disconnected) => {
                self.leave();
                return false;
            }
        }
        if !self.still_running() {
            return false;
        }
        if progress.reported.elapsed() >= PROGRESS_EVERY {
            progress.reported = Instant::now();
            self.send(Reply::Progress { checked: progress.checked, bytes: progress.bytes }.encode(self.id));
        }
        true
    }

    /// The next message, or `None` once the transfer is cancelled (or the session is closing).
    fn next(&self) -> Option<Inbox> {
        let message = self.inbox.recv().ok();
        if !self.still_running() {
            return None;
        }
        match message {
            None | Some(Inbox::Cancel) => {
                self.leave();
                None
            }
            message => message,
        }
    }

    fn still_running(&self) -> bool {
        if self.flag.load(Ordering::Acquire) == RUNNING {
            return true;
        }
        self.leave();
        false
    }

    fn send(&self, frame: Vec<u8>) {
        let _ = self.out.send(frame);
    }

    /// Leaves the table without another frame. Only this transfer's own entry is removed: after a
    /// refusal the id may already belong to a new transfer.
    fn leave(&self) {
        let mut table = lock(&self.table);
        if table.get(&self.id).is_some_and(|handle| Arc::ptr_eq(&handle.flag, &self.flag)) {
            table.remove(&self.id);
        }
    }

    /// Ends the transfer with its last frame. It leaves the table first, so that a client that
    /// starts another transfer as soon as it reads this frame finds the slot free.
    fn finish(&self, reply: Reply) {
        self.leave();
        if self.flag.load(Ordering::Acquire) == RUNNING {
            self.send(reply.encode(self.id));
        }
    }

    fn fail(&self, code: ErrorCode, message: String) {
        self.finish(Reply::Error(WireError { code, message }));
    }

    fn io_failure(&self, doing: &str, sha256: &Sha256, e: &io::Error) {
        log::warn!("{doing} {sha256}: {e}");
        let code = if e.kind() == io::ErrorKind::StorageFull { ErrorCode::NO_SPACE } else { ErrorCode::IO };
        self.fail(code, format!("{doing} {sha256}: {e}"));
    }
}

/// The request worker: answers STAT, DELETE, SPACE and LIST in the order they came.
fn answer_requests(store: &Store, requests: &Receiver<(u32, Request)>, out: &Sender<Vec<u8>>) {
    for (id, request) in requests {
        let reply = match request {
            Request::Stat(sha256) => store.stat(&sha256).map(Reply::Object),
            Request::Delete(sha256) => store.delete(&sha256).map(|existed| Reply::Deleted { existed }),
            Request::Space => store.space().map(Reply::Usage),
            Request::List { after, limit } => {
                store.list(after.as_ref(), limit.min(MAX_LIST_PAGE) as usize).map(Reply::Page)
            }
            // The reader queues only the four above.
            other => Ok(Reply::Error(WireError {
                code: ErrorCode::MALFORMED,
                message: format!("{} is not a small request", other.frame_type()),
            })),
        };
        let reply = reply.unwrap_or_else(|e| {
            log::warn!("answering request {id}: {e}");
            let code = if e.kind() == io::ErrorKind::StorageFull { ErrorCode::NO_SPACE } else { ErrorCode::IO };
            Reply::Error(WireError { code, message: e.to_string() })
        });
        if out.send(reply.encode(id)).is_err() {
            return;
        }
    }
}

/// The writer: writes frames in the order they were queued, flushing when the queue is empty.
/// On a write error (the client is gone) it stops, which makes every later send fail at once.
fn write_frames(frames: &Receiver<Vec<u8>>, output: impl Write) {
    let mut output = BufWriter::with_capacity(64 << 10, output);
    while let Ok(frame) = frames.recv() {
        let mut result = output.write_all(&frame);
        while result.is_ok() {
            match frames.try_recv() {
                Ok(frame) => result = output.write_all(&frame),
                Err(_) => break,
            }
        }
        if let Err(e) = result.and_then(|()| output.flush()) {
            log::debug!("stdout is closed: {e}");
            return;
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, AgentError> {
    thread::Builder::new().name(name.into()).spawn(f).map_err(AgentError::Thread)
}

fn join(thread: JoinHandle<()>) {
    if thread.join().is_err() {
        log::error!("an agent thread panicked");
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::proto::{RawFrame, TO_END};
    use std::os::unix::net::UnixStream;

    /// An agent serving on one end of a socket pair, in this process.
    struct Harness {
        stream: UnixStream,
        agent: Option<JoinHandle<Result<(), AgentError>>>,
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    impl Harness {
        fn start() -> Harness {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("root");
            let store = Store::open(&root).expect("store");
            let (ours, theirs) = UnixStream::pair().expect("pair");
            ours.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let input = theirs.try_clone().expect("clone");
            let agent = thread::spawn(move || serve(store, input, theirs));
            Harness { stream: ours, agent: Some(agent), _dir: dir, root }
        }

        fn welcomed() -> Harness {
            let mut h = Harness::start();
            h.send(&Request::Hello { version: VERSION }, 0);
            let (id, reply) = h.recv();
            assert_eq!(id, 0);
            assert!(matches!(reply, Reply::Welcome(_)), "{reply:?}");
            h
        }

        fn send(&mut self, request: &Request, id: u32) {
            self.stream.write_all(&request.encode(id)).expect("write");
        }

        fn recv(&mut self) -> (u32, Reply) {
            let raw: RawFrame = proto::read_frame(&mut self.stream).expect("read").expect("a frame");
            let id = raw.id;
            (id, Reply::decode(raw).expect("decodes"))
        }

        /// Ends the session and returns how `serve` ended.
        fn end(&mut self) -> Result<(), AgentError> {
            self.stream.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let agent = self.agent.take().expect("running");
            agent.join().expect("no panic")
        }

        fn temps(&self) -> usize {
            std::fs::read_dir(self.root.join("tmp")).expect("tmp").count()
        }
    }

    fn put(h: &mut Harness, id: u32, data: &[u8]) -> Reply {
        h.send(&Request::Put { sha256: Sha256::digest(data), size: data.len() as u64 }, id);
        let mut chunks = data.chunks(MAX_CHUNK);
        let mut credit = 0;
        let mut ended = false;
        loop {
            while credit > 0 {
                match chunks.next() {
                    Some(chunk) => {
                        h.send(&Request::Data(chunk.to_vec()), id);
                        credit -= 1;
                    }
                    None => break,
                }
            }
            if credit > 0 && !ended {
                h.send(&Request::End, id);
                ended = true;
            }
            match h.recv() {
                (got, Reply::Credit(n)) if got == id => credit += n,
                (got, reply) if got == id => return reply,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn get(h: &mut Harness, id: u32, sha256: Sha256, offset: u64, length: u64) -> Result<Vec<u8>, WireError> {
        h.send(&Request::Get { sha256, offset, length }, id);
        let mut data = Vec::new();
        match h.recv() {
            (_, Reply::Opened { .. }) => {}
            (_, Reply::Error(e)) => return Err(e),
            other => panic!("unexpected {other:?}"),
        }
        h.send(&Request::Credit(WINDOW), id);
        loop {
            match h.recv() {
                (_, Reply::Data(chunk)) => {
                    data.extend_from_slice(&chunk);
                    h.send(&Request::Credit(1), id);
                }
                (_, Reply::End) => return Ok(data),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn put_get_stat_delete_round_trip() {
        let mut h = Harness::welcomed();
        let data: Vec<u8> = (0..(3 * MAX_CHUNK + 17)).map(|i| (i * 7 % 251) as u8).collect();
        let sha = Sha256::digest(&data);
        assert_eq!(put(&mut h, 1, &data), Reply::Stored { existed: false });
        assert_eq!(put(&mut h, 2, &data), Reply::Stored { existed: true });
        assert_eq!(get(&mut h, 3, sha, 0, TO_END).expect("get"), data);
        assert_eq!(get(&mut h, 4, sha, 100, 1000).expect("range"), &data[100..1100]);
        assert_eq!(get(&mut h, 5, sha, data.len() as u64, TO_END).expect("empty tail"), b"");
        assert_eq!(get(&mut h, 6, sha, data.len() as u64 + 1, 1).expect_err("past end").code, ErrorCode::RANGE);
        h.send(&Request::Stat(sha), 7);
        assert_eq!(h.recv(), (7, Reply::Object(Some(data.len() as u64))));
        h.send(&Request::Space, 8);
        let (_, Reply::Usage(space)) = h.recv() else { panic!("usage") };
        assert_eq!((space.objects, space.used), (1, data.len() as u64));
        h.send(&Request::Delete(sha), 9);
        assert_eq!(h.recv(), (9, Reply::Deleted { existed: true }));
        assert_eq!(get(&mut h, 10, sha, 0, TO_END).expect_err("gone").code, ErrorCode::NOT_FOUND);
        h.end().expect("clean end");
    }

    #[test]
    fn empty_object_and_mismatch() {
        let mut h = Harness::welcomed();
        assert_eq!(put(&mut h, 1, b""), Reply::Stored { existed: false });
        h.send(&Request::Put { sha256: Sha256::digest(b"promised"), size: 5 }, 2);
        assert_eq!(h.recv(), (2, Reply::Credit(WINDOW)));
        h.send(&Request::Data(b"other".to_vec()), 2);
        assert_eq!(h.recv(), (2, Reply::Credit(1)));
        h.send(&Request::End, 2);
        let (_, Reply::Error(e)) = h.recv() else { panic!("refused") };
        assert_eq!(e.code, ErrorCode::MISMATCH);
        h.send(&Request::Stat(Sha256::digest(b"promised")), 3);
        assert_eq!(h.recv(), (3, Reply::Object(None)));
        assert_eq!(h.temps(), 0);
        h.end().expect("clean end");
    }

    #[test]
    fn the_session_must_start_with_hello() {
        let mut h = Harness::start();
        h.send(&Request::Space, 1);
        let (id, Reply::Error(e)) = h.recv() else { panic!("refused") };
        assert_eq!((id, e.code), (0, ErrorCode::HANDSHAKE));
        assert!(matches!(h.end(), Err(AgentError::Protocol(_))));

        let mut h = Harness::start();
        h.send(&Request::Hello { version: 99 }, 0);
        let (_, Reply::Error(e)) = h.recv() else { panic!("refused") };
        assert_eq!(e.code, ErrorCode::VERSION);
        assert!(h.end().is_err());
    }

    #[test]
    fn chunks_beyond_the_credit_are_refused_and_nothing_is_kept() {
        let mut h = Harness::welcomed();
        h.send(&Request::Put { sha256: Sha256([1; 32]), size: 1 << 30 }, 1);
        assert_eq!(h.recv(), (1, Reply::Credit(WINDOW)));
        // Send far more than the window without reading the credit that comes back.
        for _ in 0..(WINDOW * 4) {
            h.send(&Request::Data(vec![0; 1024]), 1);
        }
        let refusal = loop {
            match h.recv() {
                (1, Reply::Credit(_)) => continue,
                (1, Reply::Error(e)) => break e,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(refusal.code, ErrorCode::FLOW);
        // The session goes on. Replies to the refused transfer's other chunks may still be
        // ahead of the answer (the reader and the writer are different threads).
        h.send(&Request::Space, 2);
        let answer = loop {
            match h.recv() {
                (1, Reply::Credit(_) | Reply::Error(_)) => continue,
                other => break other,
            }
        };
        assert!(matches!(answer, (2, Reply::Usage(_))), "{answer:?}");
        h.end().expect("clean end");
    }

    #[test]
    fn malformed_frames_are_refused_and_the_session_goes_on() {
        let mut h = Harness::welcomed();
        // Unknown type, wrong body length, data for nobody, CREDIT for a PUT, a second HELLO.
        h.stream.write_all(&[0, 0, 0, 5, 0x42, 0, 0, 0, 1]).expect("write");
        h.stream.write_all(&[0, 0, 0, 6, 0x08, 0, 0, 0, 2, 9]).expect("write");
        h.send(&Request::Data(vec![1]), 3);
        h.send(&Request::Hello { version: VERSION }, 4);
        assert_eq!(
            h.recv().1,
            Reply::Error(WireError { code: ErrorCode::UNKNOWN_TYPE, message: "unknown frame type 0x42".into() })
        );
        let (2, Reply::Error(e)) = h.recv() else { panic!("malformed") };
        assert_eq!(e.code, ErrorCode::MALFORMED);
        let (4, Reply::Error(e)) = h.recv() else { panic!("handshake") };
        assert_eq!(e.code, ErrorCode::HANDSHAKE);
        h.send(&Request::Put { sha256: Sha256([2; 32]), size: 10 }, 5);
        assert_eq!(h.recv(), (5, Reply::Credit(WINDOW)));
        h.send(&Request::Credit(1), 5);
        let (5, Reply::Error(e)) = h.recv() else { panic!("flow") };
        assert_eq!(e.code, ErrorCode::FLOW);
        h.send(&Request::Space, 6);
        assert!(matches!(h.recv(), (6, Reply::Usage(_))));
        // A length over the maximum ends the session, with a reason on id 0.
        h.stream.write_all(&u32::MAX.to_be_bytes()).expect("write");
        let (0, Reply::Error(e)) = h.recv() else { panic!("fatal") };
        assert_eq!(e.code, ErrorCode::TOO_LARGE);
        assert!(matches!(h.end(), Err(AgentError::Protocol(_))));
    }

    #[test]
    fn too_many_transfers_are_busy_and_an_ended_session_removes_its_uploads() {
        let mut h = Harness::welcomed();
        for id in 1..=MAX_TRANSFERS {
            h.send(&Request::Put { sha256: Sha256([id as u8; 32]), size: 100 }, id);
            assert_eq!(h.recv(), (id, Reply::Credit(WINDOW)));
            h.send(&Request::Data(vec![0; 10]), id);
            assert_eq!(h.recv(), (id, Reply::Credit(1)));
        }
        h.send(&Request::Put { sha256: Sha256([0; 32]), size: 100 }, 99);
        let (99, Reply::Error(e)) = h.recv() else { panic!("busy") };
        assert_eq!(e.code, ErrorCode::BUSY);
        h.send(&Request::Put { sha256: Sha256([0; 32]), size: 100 }, 1);
        let (1, Reply::Error(e)) = h.recv() else { panic!("duplicate") };
        assert_eq!(e.code, ErrorCode::DUPLICATE_ID);
        // A cancelled transfer frees its slot.
        h.send(&Request::Cancel, 2);
        h.send(&Request::Put { sha256: Sha256([0; 32]), size: 100 }, 100);
        assert_eq!(h.recv(), (100, Reply::Credit(WINDOW)));
        assert!(h.temps() > 0);
        h.end().expect("clean end");
        assert_eq!(h.temps(), 0, "ending the session removes unfinished uploads");
    }

    #[test]
    fn verify_reports_bad_objects() {
        let mut h = Harness::welcomed();
        let good = b"good object".to_vec();
        let bad = b"soon to be damaged".to_vec();
        put(&mut h, 1, &good);
        put(&mut h, 2, &bad);
        let bad_sha = Sha256::digest(&bad);
        let hex = bad_sha.to_hex();
        std::fs::write(h.root.join("objects").join(&hex[..2]).join(&hex[2..]), b"damaged!").expect("damage");
        h.send(&Request::Verify(None), 3);
        let mut reports = Vec::new();
        let done = loop {
            match h.recv() {
                (3, Reply::Bad(b)) => reports.push(b),
                (3, Reply::Progress { .. }) => {}
                (3, reply) => break reply,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(done, Reply::Verified { checked: 2, bad: 1 });
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].sha256, bad_sha);
        h.send(&Request::Verify(Some(Sha256::digest(&good))), 4);
        assert_eq!(h.recv(), (4, Reply::Verified { checked: 1, bad: 0 }));
        h.send(&Request::Verify(Some(Sha256([7; 32]))), 5);
        let (5, Reply::Error(e)) = h.recv() else { panic!("missing") };
        assert_eq!(e.code, ErrorCode::NOT_FOUND);
        h.end().expect("clean end");
    }
}
