//! [`NodeLink`]: the daemon's connection to one storage node, through the system's `ssh`.
//!
//! A link keeps **one** session open: one `ssh DEST AGENT node --root ROOT` child whose stdin and
//! stdout carry the [`proto`](super::proto) frames. Any number of threads call it at once; every
//! call is a request (or transfer) with its own id, and their frames interleave on the session:
//!
//! - callers queue whole frames for a **writer thread** (bounded queue), the only one writing to
//!   ssh's stdin, so no caller ever blocks inside a write another caller started;
//! - a **reader thread** reads ssh's stdout and hands every frame to the channel of the call
//!   with its id; each call blocks on its own channel. Transfers are credit-based both ways, so
//!   what a channel can hold is bounded by the window (a GET's channel by the credit its caller
//!   gave), and the reader never waits for a slow caller;
//! - a **stderr thread** logs what ssh (and the agent, through it) writes on stderr and keeps
//!   its last lines, which say why a session failed ("Connection refused", "Permission denied").
//!
//! Failure handling, and why it is safe to retry: every wait has a deadline. A call that gets no
//! frame within `reply_timeout` (or cannot queue one) declares the node down: the ssh child is
//! killed, and every call in flight on that session fails at once with a retryable error
//! ([`NodeError::Lost`] or [`NodeError::Timeout`]). The same happens when ssh exits or the agent
//! ends the session. Nothing a failed call did is half-visible on the node (an upload becomes an
//! object only once verified, see [`store`](super::store)), so the caller may retry, here or on
//! another node. The next call opens a new session; opening failures are retried no sooner than
//! an exponential backoff allows (so a dead node costs one ssh attempt per backoff period, not one
//! per call), and meanwhile calls fail at once with [`NodeError::Unreachable`].

use super::proto::{
    self, BadObject, ErrorCode, FrameType, ListPage, Reply, Request, Sha256, Space, Welcome, WireError, MAX_CHUNK,
    MAX_TRANSFERS, TO_END, VERSION,
};
use crate::config::NodeConfig;
use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use sha2::Digest;
use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Frames queued for ssh's stdin at most (8 MiB of full chunks).
const WRITER_QUEUE: usize = 32;

/// Lines of ssh's stderr kept for error messages.
const STDERR_LINES: usize = 8;

/// Longest stderr line kept; a peer printing without newlines cannot grow our memory.
const STDERR_LINE_MAX: u64 = 1024;

/// Transfers whose speed is remembered.
const SPEED_SAMPLES: usize = 16;

/// Transfers smaller than this say more about latency than speed and are not sampled.
const SPEED_MIN_BYTES: u64 = 1 << 20;

/// Bad objects a [`VerifyReport`] keeps (all are counted).
const VERIFY_KEEP: usize = 10_000;

/// Timeouts and backoff of a link.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// How long opening a session may take: ssh's connection, login, and the agent's WELCOME.
    pub connect_timeout: Duration,
    /// How long a call waits for the node's next frame (or to queue one of its own) before the
    /// node is declared down. Long transfers are fine: each chunk restarts the wait.
    pub reply_timeout: Duration,
    /// How long a transfer waits for one of the link's transfer slots.
    pub slot_timeout: Duration,
    /// The first wait after a failed attempt to open a session; doubled per failure.
    pub backoff_min: Duration,
    /// The longest wait between two attempts.
    pub backoff_max: Duration,
    /// The ssh client to run.
    pub ssh_program: PathBuf,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            connect_timeout: Duration::from_secs(20),
            reply_timeout: Duration::from_secs(30),
            slot_timeout: Duration::from_secs(300),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            ssh_program: PathBuf::from("ssh"),
        }
    }
}

/// Why a call to a node failed. [`NodeError::is_retryable`] says whether trying again (later, or
/// on another node) can succeed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No session could be opened (or the last attempt failed and the backoff has not elapsed).
    #[error("node {node} is unreachable: {reason}")]
    Unreachable {
        /// The node's name.
        node: String,
        /// What ssh or the agent said.
        reason: String,
    },
    /// The session ended while the call was in flight (ssh exited, the connection dropped, the
    /// agent ended it, another call timed out).
    #[error("node {node}: the session was lost: {reason}")]
    Lost {
        /// The node's name.
        node: String,
        /// Why the session ended.
        reason: String,
    },
    /// The node stopped answering; its session was killed.
    #[error("node {node} did not answer within {}s; its session was closed", waited.as_secs_f32())]
    Timeout {
        /// The node's name.
        node: String,
        /// How long the call waited.
        waited: Duration,
    },
    /// Every transfer slot of the link stayed taken for `slot_timeout`.
    #[error("node {node}: no transfer slot came free within {}s", waited.as_secs())]
    Busy {
        /// The node's name.
        node: String,
        /// How long the call waited.
        waited: Duration,
    },
    /// The node has no such object.
    #[error("node {node} has no object {sha256}")]
    NotFound {
        /// The node's name.
        node: String,
        /// The object asked for.
        sha256: Sha256,
    },
    /// The data sent for a PUT does not hash to the sha256 given (the local file is not what
    /// the caller thinks); the node stored nothing.
    #[error("node {node} refused {sha256}: {message}")]
    Mismatch {
        /// The node's name.
        node: String,
        /// The hash the caller gave.
        sha256: Sha256,
        /// The agent's message (the hash the data has).
        message: String,
    },
    /// A whole object fetched from the node does not hash to its name: the node's copy is
    /// damaged. Another node's copy may be fine.
    #[error("node {node}: object {sha256} arrived with hash {actual}: the node's copy is damaged")]
    Corrupt {
        /// The node's name.
        node: String,
        /// The object asked for.
        sha256: Sha256,
        /// What the data hashed to.
        actual: Sha256,
    },
    /// The agent refused the request.
    #[error("node {node} refused the request: {code}: {message}")]
    Refused {
        /// The node's name.
        node: String,
        /// Why.
        code: ErrorCode,
        /// The agent's message.
        message: String,
    },
    /// The agent sent something this build does not understand; the session was closed.
    #[error("node {node}: protocol error: {message}")]
    Protocol {
        /// The node's name.
        node: String,
        /// What was wrong.
        message: String,
    },
    /// A local file or the caller's writer failed; the node is not at fault.
    #[error("{what}: {source}")]
    Local {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
}

impl NodeError {
    /// Whether the same call can succeed later or on another node: the node was unreachable,
    /// lost, slow or busy, or refused for a reason that passes (its disk, its space).
    pub fn is_retryable(&self) -> bool {
        match self {
            NodeError::Unreachable { .. }
            | NodeError::Lost { .. }
            | NodeError::Timeout { .. }
            | NodeError::Busy { .. }
            | NodeError::Protocol { .. } => true,
            NodeError::Refused { code, .. } => code.is_retryable(),
            NodeError::NotFound { .. }
            | NodeError::Mismatch { .. }
            | NodeError::Corrupt { .. }
            | NodeError::Local { .. } => false,
        }
    }
}

/// Whether a node can be reached, as far as the link knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reachability {
    /// No session has been tried yet.
    Unknown,
    /// A session is open.
    Up {
        /// When it opened.
        since: Instant,
    },
    /// The last session failed or could not be opened.
    Down {
        /// Since when.
        since: Instant,
        /// Why.
        reason: String,
        /// When the next attempt to open a session may be made.
        retry_at: Instant,
    },
}

/// A stored object, as a PUT leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutReceipt {
    /// Its hash.
    pub sha256: Sha256,
    /// Its size.
    pub size: u64,
    /// The node already had it; no data was sent.
    pub existed: bool,
    /// How long the PUT took.
    pub elapsed: Duration,
}

/// What a VERIFY found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Objects re-hashed.
    pub checked: u64,
    /// Objects found bad.
    pub bad_total: u64,
    /// The bad objects, the first [`VERIFY_KEEP`] of them.
    pub bad: Vec<BadObject>,
}

/// The link to one storage node. Cheap to clone (clones share the session); safe to call from
/// many threads at once.
#[derive(Clone)]
pub struct NodeLink {
    inner: Arc<LinkInner>,
}

impl std::fmt::Debug for NodeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLink").field("name", &self.inner.name).finish_non_exhaustive()
    }
}

struct LinkInner {
    /// The node's name, for errors and logs.
    name: String,
    /// The configured priority, for [`super::Nodes`].
    priority: i32,
    /// Timeouts and backoff.
    options: LinkOptions,
    /// Starts a session's transport (spawns ssh).
    connector: Box<dyn Fn() -> io::Result<Transport> + Send + Sync>,
    /// The current session, if one was opened; it may have died since.
    session: Mutex<Option<Arc<Session>>>,
    /// Held while a session is being opened, so concurrent callers wait for one attempt.
    opening: Mutex<()>,
    /// Reachability, backoff, and what the node said about itself.
    health: Arc<Mutex<Health>>,
    /// Transfers in progress on this link, bounded by the agent's `max_transfers`.
    slots: Slots,
}

/// What the link knows about its node between sessions.
struct Health {
    reach: Reachability,
    /// Failed attempts to open a session since the last success.
    failures: u32,
    /// No attempt to open a session before this.
    next_attempt: Option<Instant>,
    /// The last session's WELCOME.
    welcome: Option<Welcome>,
    /// The last SPACE answer, adjusted for the PUTs and DELETEs since.
    space: Option<Space>,
    /// Recent transfers: (bytes, seconds).
    speed: VecDeque<(u64, f64)>,
}

/// The two ends of a session and its process.
pub(crate) struct Transport {
    /// What the agent writes (ssh's stdout).
    pub(crate) input: Box<dyn Read + Send>,
    /// What the agent reads (ssh's stdin).
    pub(crate) output: Box<dyn Write + Send>,
    /// ssh's stderr, if there is one.
    pub(crate) stderr: Option<Box<dyn Read + Send>>,
    /// The process, killed when the session is declared dead.
    pub(crate) peer: Box<dyn Peer>,
}

/// The process (or, in tests, the socket) at the other end of a session.
pub(crate) trait Peer: Send {
    /// Ends it at once.
    fn kill(&mut self);
    /// How it ended, once it has (reaping it); `None` while it runs.
    fn try_exit(&mut self) -> Option<String>;
    /// Its process id, if it is a process.
    fn pid(&self) -> Option<u32>;
}

impl Peer for Child {
    fn kill(&mut self) {
        // An error means it has already exited.
        let _ = Child::kill(self);
    }

    fn try_exit(&mut self) -> Option<String> {
        match self.try_wait() {
            Ok(Some(status)) => Some(describe_exit(status)),
            Ok(None) => None,
            Err(e) => Some(format!("ssh could not be waited for: {e}")),
        }
    }

    fn pid(&self) -> Option<u32> {
        Some(self.id())
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("ssh exited with status {code}"),
        (None, Some(signal)) => format!("ssh was killed by signal {signal}"),
        (None, None) => format!("ssh ended: {status}"),
    }
}

impl NodeLink {
    /// A link to a configured node. Nothing is started until the first call.
    pub fn new(config: &NodeConfig, options: LinkOptions) -> NodeLink {
        let command = ssh_command(config, &options);
        let program = command.get_program().to_owned();
        let args: Vec<OsString> = command.get_args().map(OsStr::to_owned).collect();
        let connector = move || spawn_ssh(&program, &args);
        NodeLink::with_connector(&config.name, config.priority, options, Box::new(connector))
    }

    pub(crate) fn with_connector(
        name: &str,
        priority: i32,
        options: LinkOptions,
        connector: Box<dyn Fn() -> io::Result<Transport> + Send + Sync>,
    ) -> NodeLink {
        let health = Health {
            reach: Reachability::Unknown,
            failures: 0,
            next_attempt: None,
            welcome: None,
            space: None,
            speed: VecDeque::new(),
        };
        NodeLink {
            inner: Arc::new(LinkInner {
                name: name.to_owned(),
                priority,
                slots: Slots::new(MAX_TRANSFERS as usize),
                options,
                connector,
                session: Mutex::new(None),
                opening: Mutex::new(()),
                health: Arc::new(Mutex::new(health)),
            }),
        }
    }

    /// The node's configured name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node's configured priority.
    pub fn priority(&self) -> i32 {
        self.inner.priority
    }

    /// Opens a session if none is open, and returns what the agent said about itself.
    pub fn connect(&self) -> Result<Welcome, NodeError> {
        Ok(self.session()?.welcome.clone())
    }

    /// Closes the session (gracefully: the agent sees the end of its stdin). The next call opens
    /// a new one.
    pub fn disconnect(&self) {
        lock(&self.inner.session).take();
    }

    /// Stores the local file at `path` on the node as object `sha256` of `size` bytes, streaming
    /// it in chunks. The node verifies the hash before the object exists there; a file that does
    /// not match fails with [`NodeError::Mismatch`] and leaves nothing behind.
    pub fn put(&self, path: &Path, sha256: Sha256, size: u64) -> Result<PutReceipt, NodeError> {
        let local = |what: &str, source| NodeError::Local { what: format!("{what} {}", path.display()), source };
        let mut file = File::open(path).map_err(|e| local("cannot open", e))?;
        let actual = file.metadata().map_err(|e| local("cannot stat", e))?.len();
        if actual != size {
            let message = format!("the file has {actual} bytes, not {size}");
            return Err(local("cannot store", io::Error::new(io::ErrorKind::InvalidInput, message)));
        }
        let started = Instant::now();
        let _slot = self.slot()?;
        let call = self.call(Some(sha256))?;
        call.send(Request::Put { sha256, size }.encode(call.id))?;
        let chunk = call.session.chunk;
        let (mut credit, mut sent, mut ended) = (0u32, 0u64, false);
        loop {
            while credit > 0 && sent < size {
                let want = (size - sent).min(chunk as u64) as usize;
                let frame = proto::data_frame(FrameType::DATA, call.id, want, |buf| proto::read_up_to(&mut file, buf));
                let frame = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) => {
                        call.cancel();
                        let message = format!("the file ended after {sent} of {size} bytes");
                        return Err(local("cannot store", io::Error::new(io::ErrorKind::UnexpectedEof, message)));
                    }
                    Err(e) => {
                        call.cancel();
                        return Err(local("cannot read", e));
                    }
                };
                sent += (frame.len() - proto::HEADER_LEN) as u64;
                credit -= 1;
                call.send(frame)?;
            }
            if sent == size && !ended {
                call.send(Request::End.encode(call.id))?;
                ended = true;
            }
            match call.recv()? {
                Reply::Credit(n) => credit = credit.saturating_add(n),
                Reply::Stored { existed } if existed || ended => {
                    let elapsed = started.elapsed();
                    self.after_put(size, existed, elapsed);
                    return Ok(PutReceipt { sha256, size, existed, elapsed });
                }
                other => return Err(call.unexpected(&other)),
            }
        }
    }

    /// Writes `length` bytes of object `sha256` from `offset` (all the rest when `None`) to
    /// `out` as they arrive, and returns how many were written. When the whole object was asked
    /// for, its hash is checked too ([`NodeError::Corrupt`] if the node's copy is damaged; the
    /// bytes have been written by then). A range cannot be checked here: a caller resuming a
    /// download checks the whole file once it has it.
    pub fn get(&self, sha256: Sha256, offset: u64, length: Option<u64>, out: &mut dyn Write) -> Result<u64, NodeError> {
        let started = Instant::now();
        let _slot = self.slot()?;
        let call = self.call(Some(sha256))?;
        call.send(Request::Get { sha256, offset, length: length.unwrap_or(TO_END) }.encode(call.id))?;
        let (size, expected) = match call.recv()? {
            Reply::Opened { size, length } => (size, length),
            other => return Err(call.unexpected(&other)),
        };
        let whole = offset == 0 && expected == size;
        let mut hasher = whole.then(sha2::Sha256::new);
        call.send(Request::Credit(call.session.window).encode(call.id))?;
        let mut received = 0u64;
        loop {
            match call.recv()? {
                Reply::Data(chunk) => {
                    received += chunk.len() as u64;
                    if received > expected {
                        return Err(call.violation(format!("sent {received} bytes of a {expected}-byte range")));
                    }
                    if let Err(source) = out.write_all(&chunk) {
                        call.cancel();
                        return Err(NodeError::Local { what: format!("cannot write object {sha256}"), source });
                    }
                    if let Some(hasher) = hasher.as_mut() {
                        hasher.update(&chunk);
                    }
                    // The credit is returned once the chunk is written: a slow writer slows the
                    // node down instead of piling chunks up here.
                    call.send(Request::Credit(1).encode(call.id))?;
                }
                Reply::End if received == expected => break,
                other => return Err(call.unexpected(&other)),
            }
        }
        if let Some(hasher) = hasher {
            let actual = Sha256(hasher.finalize().into());
            if actual != sha256 {
                return Err(NodeError::Corrupt { node: self.inner.name.clone(), sha256, actual });
            }
        }
        self.record_speed(received, started.elapsed());
        Ok(received)
    }

    /// The object's size, or `None` when the node does not have it.
    pub fn stat(&self, sha256: Sha256) -> Result<Option<u64>, NodeError> {
        match self.request(Request::Stat(sha256), Some(sha256))? {
            (_, Reply::Object(size)) => Ok(size),
            (call, other) => Err(call.unexpected(&other)),
        }
    }

    /// Whether the node has the object.
    pub fn has(&self, sha256: Sha256) -> Result<bool, NodeError> {
        Ok(self.stat(sha256)?.is_some())
    }

    /// Removes the object; `false` when the node did not have it.
    pub fn delete(&self, sha256: Sha256) -> Result<bool, NodeError> {
        match self.request(Request::Delete(sha256), Some(sha256))? {
            (_, Reply::Deleted { existed }) => {
                if existed {
                    // The size is unknown here; the next SPACE corrects `used`.
                    if let Some(space) = lock(&self.inner.health).space.as_mut() {
                        space.objects = space.objects.saturating_sub(1);
                    }
                }
                Ok(existed)
            }
            (call, other) => Err(call.unexpected(&other)),
        }
    }

    /// The node's space and object count (also remembered for [`NodeLink::last_space`]).
    pub fn space(&self) -> Result<Space, NodeError> {
        match self.request(Request::Space, None)? {
            (_, Reply::Usage(space)) => {
                lock(&self.inner.health).space = Some(space);
                Ok(space)
            }
            (call, other) => Err(call.unexpected(&other)),
        }
    }

    /// Up to `limit` objects (at most 1024) with hashes after `after`, in hash order.
    pub fn list(&self, after: Option<Sha256>, limit: u32) -> Result<ListPage, NodeError> {
        match self.request(Request::List { after, limit }, None)? {
            (_, Reply::Page(page)) => Ok(page),
            (call, other) => Err(call.unexpected(&other)),
        }
    }

    /// Re-hashes one object (`Some`) or every object on the node, and reports the bad ones.
    pub fn verify(&self, one: Option<Sha256>) -> Result<VerifyReport, NodeError> {
        let mut bad = Vec::new();
        let (checked, bad_total) = self.verify_each(one, &mut |object| {
            if bad.len() < VERIFY_KEEP {
                bad.push(object.clone());
            }
        })?;
        Ok(VerifyReport { checked, bad_total, bad })
    }

    /// Like [`NodeLink::verify`], handing each bad object to `on_bad` as the node reports it;
    /// returns (objects checked, objects bad).
    pub fn verify_each(
        &self,
        one: Option<Sha256>,
        on_bad: &mut dyn FnMut(&BadObject),
    ) -> Result<(u64, u64), NodeError> {
        let _slot = self.slot()?;
        let call = self.call(one)?;
        call.send(Request::Verify(one).encode(call.id))?;
        loop {
            match call.recv()? {
                Reply::Progress { .. } => {}
                Reply::Bad(object) => on_bad(&object),
                Reply::Verified { checked, bad } => return Ok((checked, bad)),
                other => return Err(call.unexpected(&other)),
            }
        }
    }

    /// Whether the node is reachable, as far as the link knows (no I/O).
    pub fn reachability(&self) -> Reachability {
        lock(&self.inner.health).reach.clone()
    }

    /// The node's last known space (from the last [`NodeLink::space`], adjusted for PUTs since).
    pub fn last_space(&self) -> Option<Space> {
        lock(&self.inner.health).space
    }

    /// What the agent said about itself when the last session opened.
    pub fn welcome(&self) -> Option<Welcome> {
        lock(&self.inner.health).welcome.clone()
    }

    /// The speed of recent transfers of 1 MiB or more, in bytes per second.
    pub fn speed(&self) -> Option<f64> {
        let health = lock(&self.inner.health);
        let (bytes, secs) = health.speed.iter().fold((0u64, 0f64), |(b, s), (bytes, secs)| (b + bytes, s + secs));
        (secs > 0.0).then(|| bytes as f64 / secs)
    }

    /// The process id of the session's ssh, while one is open.
    pub fn ssh_pid(&self) -> Option<u32> {
        let session = lock(&self.inner.session).clone()?;
        if session.shared.is_dead() {
            return None;
        }
        let pid = lock(&session.shared.peer).pid();
        pid
    }

    fn after_put(&self, size: u64, existed: bool, elapsed: Duration) {
        if !existed {
            self.record_speed(size, elapsed);
            if let Some(space) = lock(&self.inner.health).space.as_mut() {
                space.used += size;
                space.objects += 1;
                space.free = space.free.saturating_sub(size);
            }
        }
    }

    fn record_speed(&self, bytes: u64, elapsed: Duration) {
        if bytes >= SPEED_MIN_BYTES && !elapsed.is_zero() {
            let mut health = lock(&self.inner.health);
            if health.speed.len() == SPEED_SAMPLES {
                health.speed.pop_front();
            }
            health.speed.push_back((bytes, elapsed.as_secs_f64()));
        }
    }

    fn slot(&self) -> Result<SlotGuard<'_>, NodeError> {
        let waited = self.inner.options.slot_timeout;
        self.inner.slots.acquire(waited).ok_or_else(|| NodeError::Busy { node: self.inner.name.clone(), waited })
    }

    /// A request answered by one frame.
    fn request(&self, request: Request, sha256: Option<Sha256>) -> Result<(Call, Reply), NodeError> {
        let call = self.call(sha256)?;
        call.send(request.encode(call.id))?;
        let reply = call.recv()?;
        Ok((call, reply))
    }

    fn call(&self, sha256: Option<Sha256>) -> Result<Call, NodeError> {
        let session = self.session()?;
        let (id, replies) = session.shared.register().map_err(|reason| self.lost(reason))?;
        Ok(Call { session, id, replies, sha256, timeout: self.inner.options.reply_timeout })
    }

    fn lost(&self, reason: String) -> NodeError {
        NodeError::Lost { node: self.inner.name.clone(), reason }
    }

    /// The open session, or a new one.
    fn session(&self) -> Result<Arc<Session>, NodeError> {
        if let Some(session) = self.live_session() {
            return Ok(session);
        }
        let _opening = lock(&self.inner.opening);
        // Another caller may have opened one while this one waited.
        if let Some(session) = self.live_session() {
            return Ok(session);
        }
        let now = Instant::now();
        {
            let health = lock(&self.inner.health);
            if let (Some(next), Reachability::Down { reason, .. }) = (health.next_attempt, &health.reach) {
                if now < next {
                    let reason = format!("{reason} (next attempt in {:.1}s)", (next - now).as_secs_f32());
                    return Err(NodeError::Unreachable { node: self.inner.name.clone(), reason });
                }
            }
        }
        match self.open() {
            Ok(session) => {
                let session = Arc::new(session);
                let mut health = lock(&self.inner.health);
                health.reach = Reachability::Up { since: Instant::now() };
                health.failures = 0;
                health.next_attempt = None;
                health.welcome = Some(session.welcome.clone());
                drop(health);
                self.inner.slots.resize(session.welcome.max_transfers.clamp(1, MAX_TRANSFERS) as usize);
                *lock(&self.inner.session) = Some(session.clone());
                log::info!(
                    "node {}: session open (agent {} on {})",
                    self.inner.name,
                    session.welcome.agent_version,
                    session.welcome.host
                );
                Ok(session)
            }
            Err(reason) => {
                let mut health = lock(&self.inner.health);
                health.failures += 1;
                let backoff = backoff(&self.inner.options, health.failures);
                let retry_at = Instant::now() + backoff;
                health.next_attempt = Some(retry_at);
                health.reach = Reachability::Down { since: now, reason: reason.clone(), retry_at };
                log::warn!(
                    "node {} is unreachable: {reason} (next attempt in {:.1}s)",
                    self.inner.name,
                    backoff.as_secs_f32()
                );
                Err(NodeError::Unreachable { node: self.inner.name.clone(), reason })
            }
        }
    }

    fn live_session(&self) -> Option<Arc<Session>> {
        let mut current = lock(&self.inner.session);
        match current.as_ref() {
            Some(session) if !session.shared.is_dead() => Some(session.clone()),
            Some(_) => {
                // Dropping the dead session lets its threads and process go.
                current.take();
                None
            }
            None => None,
        }
    }

    /// Starts ssh and waits for the agent's WELCOME.
    fn open(&self) -> Result<Session, String> {
        let transport = (self.inner.connector)().map_err(|e| format!("cannot run ssh: {e}"))?;
        let (shared, out) = start_session(&self.inner.name, transport, self.inner.health.clone())?;
        let timeout = self.inner.options.connect_timeout;
        let (id, replies) = shared.register_hello()?;
        let hello = Request::Hello { version: VERSION }.encode(id);
        if out.send_timeout(hello, timeout).is_err() {
            return Err(shared.fail_with("ssh took no input".into()));
        }
        let welcome = match replies.recv_timeout(timeout) {
            Ok(Event::Reply(Reply::Welcome(welcome))) => welcome,
            Ok(Event::Reply(Reply::Error(e))) => {
                return Err(shared.fail_with(format!("the agent refused the session: {}: {}", e.code, e.message)))
            }
            Ok(Event::Reply(other)) => {
                return Err(shared.fail_with(format!("the agent answered HELLO with {}", other.frame_type())))
            }
            Ok(Event::Lost(reason)) => return Err(reason),
            Err(_) => {
                let reason = format!("no answer from the agent within {}s", timeout.as_secs_f32());
                return Err(shared.fail_with(reason));
            }
        };
        shared.unregister(id);
        if welcome.version != VERSION {
            return Err(shared.fail_with(format!("the agent speaks protocol version {}", welcome.version)));
        }
        let chunk = (welcome.max_chunk as usize).clamp(1, MAX_CHUNK);
        let window = welcome.window.max(1);
        Ok(Session { shared, out, welcome, chunk, window })
    }
}

/// The wait before the next attempt after `failures` failed ones: doubling from `backoff_min`
/// up to `backoff_max`, with up to 25% of jitter so links to a node that came back do not all
/// reconnect at the same instant.
fn backoff(options: &LinkOptions, failures: u32) -> Duration {
    let doubled = options.backoff_min.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let base = doubled.min(options.backoff_max);
    base + base.mul_f64(rand::random::<f64>() * 0.25)
}

/// The ssh command line for a node: the configured options first (ssh keeps the first value of
/// each option, so they win), then Chime's: no tty and no escape character (the session carries
/// binary frames), BatchMode (never prompt: there is nobody to answer), no port forwardings
/// from ssh_config (they could collide between sessions), keepalives so a dead network path ends
/// ssh, then `--`, the destination, and the remote command.
pub fn ssh_command(config: &NodeConfig, options: &LinkOptions) -> Command {
    let connect_secs = options.connect_timeout.as_secs().max(1);
    let mut command = Command::new(&options.ssh_program);
    command
        .args(&config.ssh_options)
        .args(["-T", "-e", "none", "-o", "BatchMode=yes", "-o", "ClearAllForwardings=yes"])
        .arg("-o")
        .arg(format!("ConnectTimeout={connect_secs}"))
        .args(["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3", "--"])
        .arg(&config.ssh)
        .arg(remote_command(config));
    command
}

/// What the node's shell runs: the agent command as configured (it may be a path, or start with
/// `env` or `sudo -u`), then `node --root` and the root, quoted for a POSIX shell.
pub fn remote_command(config: &NodeConfig) -> String {
    format!("{} node --root {}", config.agent, shell_quote(&config.root))
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn spawn_ssh(program: &OsStr, args: &[OsString]) -> io::Result<Transport> {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its own process group: a Ctrl-C meant for the daemon must not kill the transfers the
    // daemon is still finishing.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn()?;
    let missing = || io::Error::other("ssh started without its pipes");
    let input = child.stdout.take().ok_or_else(missing)?;
    let output = child.stdin.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok(Transport {
        input: Box::new(input),
        output: Box::new(output),
        stderr: Some(Box::new(stderr)),
        peer: Box::new(child),
    })
}

/// One open session: the threads around one ssh process.
struct Session {
    /// What the reader, writer and stderr threads share with callers.
    shared: Arc<Shared>,
    /// Frames for the writer thread. Dropping the last `Session` drops this, which closes ssh's
    /// stdin: the agent ends, then ssh.
    out: Sender<Vec<u8>>,
    /// What the agent said.
    welcome: Welcome,
    /// Chunk size for PUT.
    chunk: usize,
    /// Credit to give a GET.
    window: u32,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
    }
}

/// What a reply channel receives.
enum Event {
    /// A frame for this call.
    Reply(Reply),
    /// The session died.
    Lost(String),
}

struct Shared {
    /// The node's name, for logs.
    node: String,
    /// Calls waiting for frames, and whether the session is dead.
    calls: Mutex<Calls>,
    /// Numbers calls; 0 is the session's own (HELLO).
    next_id: AtomicU32,
    /// The ssh process.
    peer: Mutex<Box<dyn Peer>>,
    /// The last lines of ssh's stderr.
    stderr: Arc<StderrTail>,
    /// The link's health, told when the session dies.
    health: Arc<Mutex<Health>>,
    /// Set when the session was closed on purpose, so its end is not a failure.
    closing: AtomicBool,
}

struct Calls {
    waiting: HashMap<u32, Sender<Event>>,
    /// Why the session died, once it has.
    dead: Option<String>,
}

/// Starts the threads of a new session around its transport; the caller then says HELLO.
fn start_session(
    node: &str,
    transport: Transport,
    health: Arc<Mutex<Health>>,
) -> Result<(Arc<Shared>, Sender<Vec<u8>>), String> {
    let Transport { input, output, stderr, peer } = transport;
    let shared = Arc::new(Shared {
        node: node.to_owned(),
        calls: Mutex::new(Calls { waiting: HashMap::new(), dead: None }),
        next_id: AtomicU32::new(1),
        peer: Mutex::new(peer),
        stderr: Arc::new(StderrTail::default()),
        health,
        closing: AtomicBool::new(false),
    });
    let (out, frames) = bounded::<Vec<u8>>(WRITER_QUEUE);
    let spawned = (|| {
        if let Some(stderr) = stderr {
            let (node, tail) = (node.to_owned(), shared.stderr.clone());
            thread::Builder::new().name(format!("node-{node}-stderr")).spawn(move || tail.read(&node, stderr))?;
        }
        let reader = shared.clone();
        thread::Builder::new().name(format!("node-{node}-reader")).spawn(move || reader.read_frames(input))?;
        let writer = shared.clone();
        thread::Builder::new()
            .name(format!("node-{node}-writer"))
            .spawn(move || writer.write_frames(&frames, output))?;
        io::Result::Ok(())
    })();
    if let Err(e) = spawned {
        return Err(shared.fail_with(format!("cannot start a thread: {e}")));
    }
    Ok((shared, out))
}

impl Shared {
    fn is_dead(&self) -> bool {
        lock(&self.calls).dead.is_some()
    }

    /// A new call id and the channel its frames arrive on; fails if the session is dead (the
    /// check and the registration are one step, so no call can miss the news of its death).
    fn register(&self) -> Result<(u32, Receiver<Event>), String> {
        let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            // After 2^32 calls on one session: 0 is the session's own.
            id = self.next_id.fetch_add(1, Ordering::Relaxed);
        }
        self.register_id(id)
    }

    fn register_hello(&self) -> Result<(u32, Receiver<Event>), String> {
        self.register_id(0)
    }

    fn register_id(&self, id: u32) -> Result<(u32, Receiver<Event>), String> {
        let mut calls = lock(&self.calls);
        if let Some(reason) = &calls.dead {
            return Err(reason.clone());
        }
        let (sender, receiver) = unbounded();
        calls.waiting.insert(id, sender);
        Ok((id, receiver))
    }

    fn unregister(&self, id: u32) {
        lock(&self.calls).waiting.remove(&id);
    }

    /// Declares the session dead (the first reason is kept), tells every waiting call, kills ssh.
    /// Returns the reason in force.
    fn fail_with(&self, reason: String) -> String {
        let (reason, waiting, first) = {
            let mut calls = lock(&self.calls);
            match &calls.dead {
                Some(first) => (first.clone(), Vec::new(), false),
                None => {
                    calls.dead = Some(reason.clone());
                    (reason, calls.waiting.drain().map(|(_, sender)| sender).collect(), true)
                }
            }
        };
        // The link's state changes before any caller hears of the loss, so a caller that looks
        // at `reachability()` after its error sees the node down. Only the call that ended the
        // session does it: a later one (the reader, done reaping ssh) may come after the next
        // session has opened. A session closed on purpose is no news.
        if first && !self.closing.load(Ordering::Acquire) {
            let mut health = lock(&self.health);
            let now = Instant::now();
            // A session that dies is not a failed attempt to open one: the next call may try at
            // once, so `next_attempt` is left as a successful open left it.
            let retry_at = health.next_attempt.unwrap_or(now);
            health.reach = Reachability::Down { since: now, reason: reason.clone(), retry_at };
        }
        lock(&self.peer).kill();
        for sender in waiting {
            let _ = sender.send(Event::Lost(reason.clone()));
        }
        reason
    }

    /// The reader thread: hands each frame to its call until the stream ends or breaks.
    fn read_frames(&self, input: Box<dyn Read + Send>) {
        let mut input = BufReader::with_capacity(64 << 10, input);
        let (why, ended_by_peer) = loop {
            let raw = match proto::read_frame(&mut input) {
                Ok(Some(raw)) => raw,
                Ok(None) => break ("the connection closed".to_owned(), true),
                Err(proto::ReadError::Io(e)) => break (format!("reading from ssh: {e}"), true),
                Err(proto::ReadError::Truncated) => break ("the connection closed inside a frame".to_owned(), true),
                Err(e) => {
                    break (
                        format!(
                            "{e}: the node's stdout carries something besides the agent (does its login shell print?)"
                        ),
                        false,
                    )
                }
            };
            let id = raw.id;
            match Reply::decode(raw) {
                Ok(Reply::Error(e)) if id == 0 => {
                    let why = format!("the agent ended the session: {}: {}", e.code, e.message);
                    self.deliver(0, Reply::Error(e));
                    break (why, false);
                }
                Ok(reply) => self.deliver(id, reply),
                Err(e) => break (format!("protocol error: {e}"), false),
            }
        };
        if !ended_by_peer {
            lock(&self.peer).kill();
        }
        // Give ssh a moment to exit and say why on stderr, then tell everyone. The peer is
        // locked only to look, so a caller killing it meanwhile does not wait.
        let deadline = Instant::now() + Duration::from_secs(2);
        let exit = loop {
            if let Some(exit) = lock(&self.peer).try_exit() {
                break Some(exit);
            }
            if Instant::now() >= deadline {
                lock(&self.peer).kill();
                break lock(&self.peer).try_exit().or(Some("ssh was killed".into()));
            }
            thread::sleep(Duration::from_millis(10));
        };
        self.stderr.wait_closed(Duration::from_millis(500));
        let mut reason = why;
        if let Some(exit) = exit {
            reason = format!("{reason}; {exit}");
        }
        let said = self.stderr.lines();
        if !said.is_empty() {
            reason = format!("{reason}; ssh said: {}", said.join(" / "));
        }
        let reason = self.fail_with(reason);
        if self.closing.load(Ordering::Acquire) {
            log::debug!("node {}: session closed", self.node);
        } else {
            log::warn!("node {}: session lost: {reason}", self.node);
        }
    }

    fn deliver(&self, id: u32, reply: Reply) {
        let calls = lock(&self.calls);
        match calls.waiting.get(&id) {
            // Unbounded, so the reader never waits for a caller; credit bounds what piles up.
            Some(sender) => {
                let _ = sender.send(Event::Reply(reply));
            }
            // The tail of a call that has ended (chunks in flight when its caller cancelled).
            None => log::trace!("node {}: dropped a {} for call {id}", self.node, reply.frame_type()),
        }
    }

    /// The writer thread: writes queued frames, flushing when the queue is empty. It ends when
    /// every sender is gone (the session was dropped), which closes ssh's stdin.
    fn write_frames(&self, frames: &Receiver<Vec<u8>>, output: Box<dyn Write + Send>) {
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
                self.fail_with(format!("writing to ssh: {e}"));
                return;
            }
        }
    }
}

/// One request or transfer in flight: its id and the channel its frames arrive on.
struct Call {
    session: Arc<Session>,
    id: u32,
    replies: Receiver<Event>,
    /// The object the call is about, for errors.
    sha256: Option<Sha256>,
    timeout: Duration,
}

impl Call {
    fn node(&self) -> String {
        self.session.shared.node.clone()
    }

    /// Queues a frame; a node that takes nothing for `timeout` is declared down.
    fn send(&self, frame: Vec<u8>) -> Result<(), NodeError> {
        match self.session.out.send_timeout(frame, self.timeout) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(_)) => {
                self.session.shared.fail_with(format!("the node took no data for {}s", self.timeout.as_secs_f32()));
                Err(NodeError::Timeout { node: self.node(), waited: self.timeout })
            }
            Err(SendTimeoutError::Disconnected(_)) => Err(self.lost()),
        }
    }

    /// The next frame for this call; an ERROR becomes the matching [`NodeError`]. A node that
    /// sends nothing for `timeout` is declared down.
    fn recv(&self) -> Result<Reply, NodeError> {
        match self.replies.recv_timeout(self.timeout) {
            Ok(Event::Reply(Reply::Error(e))) => Err(self.refused(e)),
            Ok(Event::Reply(reply)) => Ok(reply),
            Ok(Event::Lost(reason)) => Err(NodeError::Lost { node: self.node(), reason }),
            Err(RecvTimeoutError::Timeout) => {
                let reason = format!("no answer within {}s", self.timeout.as_secs_f32());
                self.session.shared.fail_with(reason);
                Err(NodeError::Timeout { node: self.node(), waited: self.timeout })
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.lost()),
        }
    }

    fn lost(&self) -> NodeError {
        let reason = lock(&self.session.shared.calls).dead.clone().unwrap_or_else(|| "the session ended".into());
        NodeError::Lost { node: self.node(), reason }
    }

    fn refused(&self, e: WireError) -> NodeError {
        let node = self.node();
        match (e.code, self.sha256) {
            (ErrorCode::NOT_FOUND, Some(sha256)) => NodeError::NotFound { node, sha256 },
            (ErrorCode::MISMATCH, Some(sha256)) => NodeError::Mismatch { node, sha256, message: e.message },
            (code, _) => NodeError::Refused { node, code, message: e.message },
        }
    }

    /// Tells the agent to stop this transfer, so it frees the transfer's slot; if even that
    /// cannot be queued in time the node is stuck, and its session is ended instead.
    fn cancel(&self) {
        let _ = self.send(Request::Cancel.encode(self.id));
    }

    /// The agent answered with a frame that makes no sense here: its session cannot be trusted.
    fn unexpected(&self, reply: &Reply) -> NodeError {
        self.violation(format!("unexpected {} for call {}", reply.frame_type(), self.id))
    }

    fn violation(&self, message: String) -> NodeError {
        self.session.shared.fail_with(format!("protocol error: {message}"));
        NodeError::Protocol { node: self.node(), message }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.session.shared.unregister(self.id);
    }
}

/// The last lines ssh wrote on stderr, and whether it has closed stderr.
#[derive(Default)]
struct StderrTail {
    state: Mutex<(VecDeque<String>, bool)>,
    closed: Condvar,
}

impl StderrTail {
    /// The stderr thread: logs every line and keeps the last few.
    fn read(&self, node: &str, stderr: Box<dyn Read + Send>) {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader).take(STDERR_LINE_MAX).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    if text.is_empty() {
                        continue;
                    }
                    log::info!("node {node}: {text}");
                    let mut state = lock(&self.state);
                    if state.0.len() == STDERR_LINES {
                        state.0.pop_front();
                    }
                    state.0.push_back(text);
                }
            }
        }
        lock(&self.state).1 = true;
        self.closed.notify_all();
    }

    fn wait_closed(&self, wait: Duration) {
        let state = lock(&self.state);
        let _ = self.closed.wait_timeout_while(state, wait, |state| !state.1);
    }

    fn lines(&self) -> Vec<String> {
        lock(&self.state).0.iter().cloned().collect()
    }
}

/// A counting semaphore over the link's transfers.
struct Slots {
    state: Mutex<(usize, usize)>, // (in use, limit)
    freed: Condvar,
}

struct SlotGuard<'a>(&'a Slots);

impl Slots {
    fn new(limit: usize) -> Slots {
        Slots { state: Mutex::new((0, limit)), freed: Condvar::new() }
    }

    fn resize(&self, limit: usize) {
        lock(&self.state).1 = limit;
        self.freed.notify_all();
    }

    fn acquire(&self, wait: Duration) -> Option<SlotGuard<'_>> {
        let state = lock(&self.state);
        let (mut state, timeout) = self
            .freed
            .wait_timeout_while(state, wait, |(used, limit)| used >= limit)
            .unwrap_or_else(PoisonError::into_inner);
        if timeout.timed_out() && state.0 >= state.1 {
            return None;
        }
        state.0 += 1;
        Some(SlotGuard(self))
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).0 -= 1;
        self.0.freed.notify_one();
    }
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Links to in-process agents for tests (here and in the content store's): the link's logic
/// without ssh.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::node::agent;
    use crate::node::store::Store;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The agent in this process, on a socket pair.
    struct Local(UnixStream);

    impl Peer for Local {
        fn kill(&mut self) {
            let _ = self.0.shutdown(std::net::Shutdown::Both);
        }
        fn try_exit(&mut self) -> Option<String> {
            Some("the in-process agent's socket closed".into())
        }
        fn pid(&self) -> Option<u32> {
            None
        }
    }

    /// Short deadlines, so a test that loses a node fails over quickly.
    pub(crate) fn options() -> LinkOptions {
        LinkOptions {
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            ..LinkOptions::default()
        }
    }

    /// A link named `name` whose sessions are in-process agents over `root`; counts the sessions
    /// opened in `opened`.
    pub(crate) fn local_link(name: &str, root: &Path, opened: Arc<AtomicUsize>) -> NodeLink {
        let root = root.to_path_buf();
        let connector = move || {
            opened.fetch_add(1, Ordering::SeqCst);
            let store = Store::open(&root)?;
            let (ours, theirs) = UnixStream::pair()?;
            let agent_input = theirs.try_clone()?;
            std::thread::spawn(move || agent::serve(store, agent_input, theirs));
            Ok(Transport {
                input: Box::new(ours.try_clone()?),
                output: Box::new(ours.try_clone()?),
                stderr: None,
                peer: Box::new(Local(ours)),
            })
        };
        NodeLink::with_connector(name, 0, options(), Box::new(connector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use testing::{local_link as named_link, options};

    fn local_link(root: &Path, opened: Arc<AtomicUsize>) -> NodeLink {
        named_link("local", root, opened)
    }

    fn file_with(dir: &Path, name: &str, data: &[u8]) -> (PathBuf, Sha256) {
        let path = dir.join(name);
        std::fs::write(&path, data).expect("write");
        (path, Sha256::digest(data))
    }

    #[test]
    fn put_get_and_small_requests_over_an_in_process_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = local_link(&dir.path().join("node"), Arc::new(AtomicUsize::new(0)));
        let data: Vec<u8> = (0..(2 * MAX_CHUNK + 5)).map(|i| (i % 253) as u8).collect();
        let (path, sha) = file_with(dir.path(), "f", &data);
        let receipt = link.put(&path, sha, data.len() as u64).expect("put");
        assert!(!receipt.existed);
        assert!(link.put(&path, sha, data.len() as u64).expect("put again").existed);
        let mut out = Vec::new();
        assert_eq!(link.get(sha, 0, None, &mut out).expect("get"), data.len() as u64);
        assert_eq!(out, data);
        let mut range = Vec::new();
        assert_eq!(link.get(sha, 10, Some(20), &mut range).expect("range"), 20);
        assert_eq!(range, &data[10..30]);
        assert_eq!(link.stat(sha).expect("stat"), Some(data.len() as u64));
        let space = link.space().expect("space");
        assert_eq!((space.objects, space.used), (1, data.len() as u64));
        assert_eq!(link.list(None, 10).expect("list").entries.len(), 1);
        assert_eq!(link.verify(None).expect("verify").checked, 1);
        assert!(link.delete(sha).expect("delete"));
        assert!(matches!(link.get(sha, 0, None, &mut Vec::new()), Err(NodeError::NotFound { .. })));
        assert!(matches!(link.reachability(), Reachability::Up { .. }));
    }

    #[test]
    fn a_file_that_is_not_what_the_caller_says_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = local_link(&dir.path().join("node"), Arc::new(AtomicUsize::new(0)));
        let (path, _) = file_with(dir.path(), "f", b"actual content");
        let claimed = Sha256::digest(b"claimed content");
        let err = link.put(&path, claimed, 14).expect_err("mismatch");
        assert!(matches!(err, NodeError::Mismatch { .. }), "{err}");
        assert!(!err.is_retryable());
        assert_eq!(link.stat(claimed).expect("stat"), None);
        let err = link.put(&path, claimed, 15).expect_err("wrong size");
        assert!(matches!(err, NodeError::Local { .. }), "{err}");
    }

    #[test]
    fn a_dead_session_fails_its_calls_and_the_next_call_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = Arc::new(AtomicUsize::new(0));
        let link = local_link(&dir.path().join("node"), opened.clone());
        link.space().expect("space");
        let session = lock(&link.inner.session).clone().expect("a session");
        session.shared.fail_with("killed by the test".into());
        drop(session);
        assert!(matches!(link.reachability(), Reachability::Down { .. }));
        link.space().expect("space after reopening");
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn failed_opens_back_off() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = attempts.clone();
        let connector = move || -> io::Result<Transport> {
            counted.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::new(io::ErrorKind::NotFound, "no ssh here"))
        };
        let link = NodeLink::with_connector("nowhere", 0, options(), Box::new(connector));
        for _ in 0..5 {
            let err = link.space().expect_err("unreachable");
            assert!(matches!(err, NodeError::Unreachable { .. }), "{err}");
            assert!(err.is_retryable());
            assert!(err.to_string().contains("no ssh here"), "{err}");
        }
        // The first failure set a backoff; the calls right after it did not try again.
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        thread::sleep(Duration::from_millis(300));
        let _ = link.space();
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let options = LinkOptions {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            ..LinkOptions::default()
        };
        let within = |failures, low: f64, high: f64| {
            let wait = backoff(&options, failures).as_secs_f64();
            assert!((low..=high).contains(&wait), "{failures} failures: {wait}s");
        };
        within(1, 1.0, 1.25);
        within(2, 2.0, 2.5);
        within(3, 4.0, 5.0);
        within(10, 10.0, 12.5);
        within(u32::MAX, 10.0, 12.5);
    }

    #[test]
    fn the_remote_command_quotes_the_root() {
        let config = NodeConfig {
            name: "n".into(),
            ssh: "ssh://u@h:2222".into(),
            ssh_options: vec!["-F".into(), "/tmp/cfg".into()],
            root: "/srv/it's here".into(),
            agent: "/opt/chimed".into(),
            priority: 0,
        };
        assert_eq!(remote_command(&config), r"/opt/chimed node --root '/srv/it'\''s here'");
        let command = ssh_command(&config, &LinkOptions::default());
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(&args[..2], ["-F", "/tmp/cfg"]);
        assert!(args.contains(&"BatchMode=yes".to_owned()));
        let dashes = args.iter().position(|a| a == "--").expect("--");
        assert_eq!(args[dashes + 1], "ssh://u@h:2222");
        assert_eq!(args.len(), dashes + 3);
    }
}
