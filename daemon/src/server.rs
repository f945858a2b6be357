//! The event loop: one `mio` thread that owns every socket.
//!
//! The loop accepts connections, reads and decodes frames, answers what it can answer from memory
//! (handshake, heartbeats), hands everything that touches the store to the worker pool, and
//! delivers the pool's completions: replies to their requester and committed deltas to every
//! online member of the room. It never blocks: sockets are non-blocking, jobs are queued with
//! `try_send` (a full queue is an OVERLOADED reply), and the pool wakes the loop through a
//! `mio::Waker` when results are ready.
//!
//! Fan-out: the loop keeps, per room, the online connections of its members. A published batch of
//! deltas is one shared buffer; each recipient's queue gets a reference to it and the connection
//! is marked dirty. Dirty connections are flushed once at the end of each loop iteration, so
//! everything that arrived in one iteration leaves in one vectored write per connection.
//!
//! Life of a message: socket -> `Conn::read` -> `FrameDecoder` -> `Job::Post` on the room's shard
//! -> group commit in the store -> `Completion::Batch` -> `publish` to every subscriber's queue
//! and `POSTED` to the author -> `flush`.
//!
//! Bounds a peer cannot talk its way past: connections per address, a deadline to log in,
//! requests in flight per connection (and a smaller window of them on the shared queue, which
//! every connection's reads wait in), reading paused while a connection's replies are unread,
//! the cost of its outbound queue, a write timeout, and a server-wide budget for all outbound
//! queues together (see `enforce_budget`).

use crate::auth;
use crate::config::{redact_database_url, Config};
use crate::conn::{Class, Conn, Phase, ReadOutcome, Session};
use crate::ratelimit::{KeyedLimiter, TokenBucket};
use crate::sync::{Action, DEFAULT_PAGE, MAX_PAGE};
use crate::tls::{fingerprint_hex, TlsSetup};
use crate::worker::{
    published_bytes, Actor, Completion, ConnRef, EncodeReply, FetchPurpose, Job, Notify, Pool, Published, Queue,
    ReplyTo, Settings,
};
use anyhow::Context as _;
use bytes::Bytes;
use chime_protocol::{
    ClientFrame, DecodeError, ErrorBody, ErrorCode, FrameDecoder, Ping, RawFrame, ServerFrame, Welcome, MAGIC,
    PROTOCOL_VERSION,
};
use chime_storage::{NewPost, SessionId, SessionLimits};
use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
const TLS_LISTENER: Token = Token(2);
const PLAIN_LISTENER: Token = Token(3);
const FIRST_CONN: usize = 16;

/// Requests one connection may have with the workers at once; past it, its frames wait in its
/// read buffer (and reading pauses), which is how a pipelining client gets backpressure.
const MAX_INFLIGHT: u32 = 256;
/// Of those, jobs one connection may have on the shared queue at once (reads, SYNC pages):
/// every connection's reads wait in that one queue, so a connection's share of it is a small
/// window, and queue order between busy connections becomes round robin.
const SHARED_WINDOW: u32 = 4;
/// A connection whose outbound queue costs more than this share of `max_outbound_bytes` is not
/// read until it drains to a quarter: replies it has not read stop it from asking for more.
const READ_PAUSE_DIVISOR: usize = 2;
/// Queues costing at most this are never cut off by the server-wide budget: the budget goes
/// after the connections that hold the most.
const FAIR_SHARE: usize = 64 * 1024;
/// Give freed heap back to the OS once this much outbound memory was released since last time.
const TRIM_AFTER: usize = 16 << 20;
/// Seconds between records of "still in use" for the sessions of connections that stay open, so
/// a session connected for weeks is not idle-expired if the daemon is killed before it closes.
const TOUCH_LIVE_EVERY: u32 = 3600;
/// Seconds a connection may take to complete the TLS and Chime handshakes.
const HANDSHAKE_SECS: u32 = 10;
/// Longest accepted message text, in bytes.
pub const MAX_TEXT: usize = 16 * 1024;
/// Longest idempotency key, in bytes.
const MAX_KEY: usize = 64;
/// Longest room name, in characters.
const MAX_ROOM_NAME: usize = 100;
/// Most rooms in one SYNC.
const MAX_SYNC_ROOMS: usize = 1000;
/// Seconds between graceful-shutdown start and the forced close of whatever is left.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Runs the daemon until SIGTERM or SIGINT. `tls` is `None` only in tests that want plaintext
/// alone; `chimed serve` always passes a certificate.
pub fn run(config: Config, database_url: String, tls: Option<TlsSetup>) -> anyhow::Result<()> {
    let mut server = Server::bind(config, &database_url, tls)?;
    server.run()
}

/// The loop's state. Fields are private to this module; see the module docs for the flow.
pub struct Server {
    config: Config,
    poll: Poll,
    /// Accepted connections by `token - FIRST_CONN`.
    conns: Slab<Conn>,
    /// Online subscribers per room: keys of connections whose user is a member.
    rooms: HashMap<u64, Vec<usize>>,
    /// Logged-in connections per user, to apply membership changes to all of a user's devices.
    users: HashMap<u64, Vec<usize>>,
    /// Logged-in connections per session, to end them all when the session is revoked.
    sessions: HashMap<SessionId, Vec<usize>>,
    /// Sessions whose connections closed since the last tick: their last use is recorded in one
    /// job per tick.
    touched: Vec<SessionId>,
    /// The last seq published per room: a connection subscribed with an older view of a room
    /// (its login read the room list before a commit the loop has already published) catches up.
    room_heads: HashMap<u64, u64>,
    pool: Option<Pool>,
    completions: Receiver<Completion>,
    tls_listener: Option<TcpListener>,
    plain_listener: Option<TcpListener>,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    signals: signal_hook_mio::v1_0::Signals,
    decoder: FrameDecoder,
    /// Scratch space for socket and TLS reads.
    scratch: Box<[u8]>,
    /// Connections with queued output to flush at the end of this iteration.
    dirty: Vec<usize>,
    /// Connections to read or decode again next iteration (read budget used up, or frames
    /// waiting behind the in-flight cap).
    again: Vec<usize>,
    accept_bucket: TokenBucket,
    login_bucket: TokenBucket,
    login_per_ip: KeyedLimiter<IpAddr>,
    /// RESUME attempts per address: each is a token guess and a database write.
    resume_per_ip: KeyedLimiter<IpAddr>,
    /// Room creations per user.
    create_per_user: KeyedLimiter<u64>,
    /// Open connections per address (IPv4, or IPv6 /64).
    per_ip: HashMap<IpAddr, u32>,
    /// What every connection's buffers cost, kept exact after each change (see `Totals`).
    totals: Totals,
    /// When the server-wide budget was last enforced, so a budget that cannot be met does not
    /// make every iteration scan every connection.
    last_enforced: Option<Instant>,
    accept_paused: bool,
    next_gen: u64,
    started: Instant,
    /// Whole seconds since start, refreshed every iteration (heartbeat clock).
    now_secs: u32,
    last_tick: u32,
    shutdown_deadline: Option<Instant>,
}

fn listener(addr: &str) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("bad listen address {addr:?}"))?;
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| format!("cannot listen on {addr}"))?;
    socket.listen(4096).with_context(|| format!("cannot listen on {addr}"))?;
    Ok(TcpListener::from_std(socket.into()))
}

impl Server {
    /// Binds the listeners and starts the worker pool.
    pub fn bind(config: Config, database_url: &str, tls: Option<TlsSetup>) -> anyhow::Result<Server> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, completions) = crossbeam_channel::bounded(16_384);
        let settings = Settings {
            workers: config.workers,
            auth_workers: config.auth_workers,
            max_batch: config.max_batch,
            max_rooms_per_user: config.max_rooms_per_user,
            session_limits: session_limits(&config),
            busy_timeout: Duration::from_millis(config.database_busy_timeout_ms),
        };
        let pool = Pool::start(database_url, settings, Notify { completions: tx, waker })?;
        let mut local_addrs = Vec::new();
        let mut tls_listener = None;
        let mut tls_config = None;
        let mut fingerprint = None;
        if let Some(t) = tls {
            let mut l = listener(&config.listen)?;
            poll.registry().register(&mut l, TLS_LISTENER, Interest::READABLE)?;
            local_addrs.push(("tls".to_string(), l.local_addr()?));
            tls_listener = Some(l);
            tls_config = Some(t.config);
            fingerprint = Some(fingerprint_hex(&t.fingerprint));
        }
        let mut plain_listener = None;
        if let Some(addr) = &config.plaintext_listen {
            let mut l = listener(addr)?;
            poll.registry().register(&mut l, PLAIN_LISTENER, Interest::READABLE)?;
            local_addrs.push(("plaintext".to_string(), l.local_addr()?));
            plain_listener = Some(l);
        }
        anyhow::ensure!(!local_addrs.is_empty(), "no listener configured");
        let mut signals =
            signal_hook_mio::v1_0::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        let listening: Vec<String> = local_addrs.iter().map(|(k, a)| format!("{k} {a}")).collect();
        log::info!(
            "chimed {} listening on {}; store {}; certificate SHA-256 {}",
            env!("CARGO_PKG_VERSION"),
            listening.join(", "),
            redact_database_url(database_url),
            fingerprint.as_deref().unwrap_or("none (no TLS listener)")
        );
        let now = Instant::now();
        Ok(Server {
            decoder: FrameDecoder::new(config.max_frame),
            accept_bucket: TokenBucket::new(config.accept_rate, config.accept_rate, now),
            login_bucket: TokenBucket::new(config.login_rate, config.login_rate, now),
            login_per_ip: KeyedLimiter::new(
                config.login_rate.div_ceil(5).max(1),
                config.login_rate.div_ceil(5).max(1),
                100_000,
            ),
            resume_per_ip: KeyedLimiter::new(config.resume_rate_per_ip, config.resume_rate_per_ip, 100_000),
            create_per_user: KeyedLimiter::per_minute(
                config.room_create_per_minute,
                config.room_create_per_minute,
                100_000,
            ),
            per_ip: HashMap::new(),
            totals: Totals::default(),
            last_enforced: None,
            config,
            poll,
            conns: Slab::new(),
            rooms: HashMap::new(),
            users: HashMap::new(),
            sessions: HashMap::new(),
            touched: Vec::new(),
            room_heads: HashMap::new(),
            pool: Some(pool),
            completions,
            tls_listener,
            plain_listener,
            tls_config,
            signals,
            scratch: vec![0u8; 64 * 1024].into_boxed_slice(),
            dirty: Vec::new(),
            again: Vec::new(),
            accept_paused: false,
            next_gen: 1,
            started: now,
            now_secs: 0,
            last_tick: 0,
            shutdown_deadline: None,
        })
    }

    /// Runs the loop until a signal and the graceful shutdown that follows.
    pub fn run(&mut self) -> anyhow::Result<()> {
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            log::debug!("sd_notify: {e}");
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if !self.again.is_empty() || !self.completions.is_empty() {
                Duration::ZERO
            } else if self.accept_paused || self.shutdown_deadline.is_some() {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(500)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            self.now_secs = self.started.elapsed().as_secs() as u32;
            let again = std::mem::take(&mut self.again);
            for key in again {
                self.service(key, true, false);
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    SIGNALS => self.on_signal(),
                    TLS_LISTENER | PLAIN_LISTENER => self.accept_all(),
                    Token(t) => {
                        if let Some(key) = t.checked_sub(FIRST_CONN) {
                            self.service(key, event.is_readable() || event.is_read_closed(), event.is_writable())
                        }
                    }
                }
            }
            self.drain_completions();
            self.flush_dirty();
            self.enforce_budget();
            if !self.touched.is_empty() {
                self.touch_sessions(false);
            }
            if self.now_secs != self.last_tick {
                self.last_tick = self.now_secs;
                self.tick();
            }
            if self.accept_paused {
                self.accept_all();
            }
            if self.shutdown_deadline.is_some() && self.shutdown_step() {
                break;
            }
        }
        // Every connection is closed by now: their sessions' last use is now.
        self.touch_sessions(false);
        if let Some(pool) = self.pool.take() {
            // Workers may be blocked handing results to a loop that is gone: drain until they exit.
            let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
            let completions = self.completions.clone();
            let drainer = std::thread::spawn(move || loop {
                if done_rx.try_recv().is_ok() {
                    break;
                }
                let _ = completions.recv_timeout(Duration::from_millis(20));
            });
            pool.shutdown();
            let _ = done_tx.send(());
            let _ = drainer.join();
        }
        log::info!("chimed stopped");
        Ok(())
    }

    fn on_signal(&mut self) {
        let got: Vec<i32> = self.signals.pending().collect();
        if got.is_empty() || self.shutdown_deadline.is_some() {
            return;
        }
        log::info!("signal {got:?}: stopping (no new connections; finishing requests in flight)");
        self.shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
        // Dropping a listener closes it: new connections are refused from here on.
        for mut l in [self.tls_listener.take(), self.plain_listener.take()].into_iter().flatten() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_paused = false;
    }

    /// One step of a graceful shutdown. Returns true when the loop may end.
    fn shutdown_step(&mut self) -> bool {
        let deadline = self.shutdown_deadline.unwrap_or_else(Instant::now);
        let busy = self.conns.iter().any(|(_, c)| c.inflight > 0);
        if busy && Instant::now() < deadline {
            return false;
        }
        // Nothing in flight: every acknowledged write is committed. Say goodbye and close.
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in &keys {
            if let Some(c) = self.conns.get_mut(*key) {
                c.goodbye_after_queue(ErrorCode::SHUTTING_DOWN, "server shutting down; reconnect later");
                self.mark_dirty(*key);
            }
        }
        self.flush_dirty();
        let all_flushed = self.conns.iter().all(|(_, c)| !c.has_pending_output());
        if all_flushed || Instant::now() >= deadline + Duration::from_secs(1) {
            for key in keys {
                self.close(key);
            }
            return true;
        }
        false
    }

    fn accept_all(&mut self) {
        self.accept_paused = false;
        for (token, is_tls) in [(TLS_LISTENER, true), (PLAIN_LISTENER, false)] {
            loop {
                if self.conns.len() >= self.config.max_connections {
                    // Leave the rest in the kernel's backlog; retried on the next iteration.
                    self.accept_paused = true;
                    return;
                }
                let listener = match token {
                    TLS_LISTENER => self.tls_listener.as_ref(),
                    _ => self.plain_listener.as_ref(),
                };
                let Some(listener) = listener else { break };
                match listener.accept() {
                    Ok((sock, peer)) => {
                        self.add_conn(sock, peer, is_tls);
                        if !self.accept_bucket.try_take(Instant::now()) {
                            // Over the accept rate: the rest wait in the kernel's backlog.
                            self.accept_paused = true;
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        log::warn!("accept failed: {e}");
                        self.accept_paused = true;
                        return;
                    }
                }
            }
        }
    }

    fn add_conn(&mut self, sock: mio::net::TcpStream, peer: SocketAddr, is_tls: bool) {
        let source = ip_key(peer.ip());
        let count = self.per_ip.get(&source).copied().unwrap_or(0);
        if count as usize >= self.config.max_connections_per_ip {
            // Dropped before any TLS work: the cheapest possible refusal.
            log::debug!("refusing {peer}: {count} connections from {source} already");
            return;
        }
        let _ = sock.set_nodelay(true);
        let keepalive =
            socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
        let _ = socket2::SockRef::from(&sock).set_tcp_keepalive(&keepalive);
        let tls = match (is_tls, &self.tls_config) {
            (true, Some(cfg)) => match rustls::ServerConnection::new(cfg.clone()) {
                Ok(mut c) => {
                    c.set_buffer_limit(Some(64 * 1024));
                    Some(Box::new(c))
                }
                Err(e) => {
                    log::error!("TLS session setup failed: {e}");
                    return;
                }
            },
            _ => None,
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let id = ConnRef { key, gen: self.next_gen };
        self.next_gen += 1;
        let mut conn = Conn::new(id, sock, peer, tls, self.now_secs);
        // Both interests, once: mio is edge-triggered, so this costs no extra wake-ups and saves a
        // reregister call every time the queue fills or empties.
        if let Err(e) = self.poll.registry().register(
            conn.socket(),
            Token(key + FIRST_CONN),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::error!("registering a connection failed: {e}");
            return;
        }
        entry.insert(conn);
        *self.per_ip.entry(source).or_insert(0) += 1;
        log::debug!("connection {key} from {peer}");
    }

    /// Handles readiness of one connection.
    fn service(&mut self, key: usize, readable: bool, writable: bool) {
        let max_buffered = self.config.max_frame as usize + 64 * 1024;
        let over_budget = self.over_budget();
        let max_outbound = self.config.max_outbound_bytes;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let mut closed = false;
        if readable && !conn.closing {
            if !may_read(conn, max_outbound, over_budget) {
                // Its replies are not being read: reading more requests would only queue more.
                // `flush_dirty` reads again once the queue has drained.
                conn.read_paused = true;
            } else {
                let outcome = conn.read(&mut self.scratch, max_buffered);
                self.totals.reconcile(conn);
                match outcome {
                    ReadOutcome::Drained => {}
                    ReadOutcome::More => self.again.push(key),
                    ReadOutcome::Closed => closed = true,
                }
            }
            // TLS handshakes write during reads.
            self.mark_dirty(key);
        }
        if writable {
            self.mark_dirty(key);
        }
        self.process_frames(key);
        if closed {
            self.close(key);
        }
    }

    fn process_frames(&mut self, key: usize) {
        let max_outbound = self.config.max_outbound_bytes;
        loop {
            let over_budget = self.over_budget();
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if !may_read(conn, max_outbound, over_budget) {
                conn.read_paused = true;
            }
            if conn.closing
                || conn.read_paused
                || conn.parked.is_some()
                || conn.inflight >= MAX_INFLIGHT
                || conn.tls_handshaking()
            {
                break;
            }
            match self.decoder.decode(&mut conn.rbuf) {
                Ok(None) => break,
                Ok(Some(raw)) => {
                    conn.last_heard = self.now_secs;
                    conn.ping_sent = false;
                    self.handle_frame(key, raw);
                }
                Err(e) => {
                    // A bad length loses frame boundaries: answer and close.
                    let code = match e {
                        DecodeError::TooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
                        _ => ErrorCode::BAD_FRAME,
                    };
                    log::debug!("closing {}: {e}", conn.peer);
                    self.error_and_close(key, 0, code, &e.to_string());
                    break;
                }
            }
        }
        if let Some(conn) = self.conns.get_mut(key) {
            conn.shrink_read_buffer();
            self.totals.reconcile(conn);
        }
    }

    fn over_budget(&self) -> bool {
        self.totals.own + published_bytes() > self.config.max_outbound_total_bytes
    }

    fn handle_frame(&mut self, key: usize, raw: RawFrame) {
        let rid = raw.request_id;
        let frame = match ClientFrame::decode(&raw) {
            Ok(f) => f,
            Err(e) => {
                let handshaking = self.conns.get(key).is_some_and(|c| c.phase == Phase::Handshake);
                let code = match e {
                    DecodeError::UnknownType(_) => ErrorCode::UNKNOWN_TYPE,
                    _ => ErrorCode::BAD_FRAME,
                };
                if handshaking {
                    self.error_and_close(key, rid, ErrorCode::HANDSHAKE_REQUIRED, &format!("expected HELLO: {e}"));
                } else {
                    self.error(key, rid, code, &e.to_string());
                }
                return;
            }
        };
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let phase = conn.phase.clone();
        match (phase, frame) {
            (Phase::Handshake, ClientFrame::Hello(h)) => {
                if h.magic != MAGIC || h.protocol_version != PROTOCOL_VERSION {
                    let msg = format!(
                        "unsupported protocol version {} (this server speaks version {PROTOCOL_VERSION})",
                        h.protocol_version
                    );
                    self.error_and_close(key, rid, ErrorCode::VERSION_UNSUPPORTED, &msg);
                    return;
                }
                log::debug!("{} speaks {} {}", conn.peer, h.client_name, h.client_version);
                conn.phase = Phase::Open;
                let welcome = Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    server_name: "chimed".into(),
                    server_version: env!("CARGO_PKG_VERSION").into(),
                    max_frame: self.config.max_frame,
                    heartbeat_secs: self.config.heartbeat_secs,
                };
                self.reply(key, ServerFrame::Welcome(welcome).reply(rid));
            }
            (Phase::Handshake, _) => {
                self.error_and_close(key, rid, ErrorCode::HANDSHAKE_REQUIRED, "the first frame must be HELLO")
            }
            (_, ClientFrame::Hello(_)) => self.error(key, rid, ErrorCode::BAD_FRAME, "HELLO was already received"),
            (_, ClientFrame::Ping(p)) => self.reply(key, ServerFrame::Pong(p).reply(rid)),
            (_, ClientFrame::Pong(_)) => {}
            (_, _) if self.shutdown_deadline.is_some() => {
                self.error(key, rid, ErrorCode::SHUTTING_DOWN, "server shutting down; retry after reconnecting")
            }
            (Phase::Open, ClientFrame::Register(c)) => self.password(key, rid, true, c),
            (Phase::Open, ClientFrame::Login(c)) => self.password(key, rid, false, c),
            (Phase::Open, ClientFrame::Resume(r)) => {
                let Some(c) = self.conns.get_mut(key) else { return };
                if !self.resume_per_ip.try_take(c.peer.ip(), Instant::now()) {
                    return self.error(key, rid, ErrorCode::RATE_LIMITED, "too many resumes; retry in a few seconds");
                }
                c.phase = Phase::Authenticating;
                self.submit(key, rid, Job::Resume { to: self.to(key, rid), token: r.token });
            }
            (Phase::Authenticating, _) => {
                self.error(key, rid, ErrorCode::NOT_AUTHENTICATED, "a login is in progress on this connection")
            }
            (Phase::Authed(_), ClientFrame::Register(_) | ClientFrame::Login(_) | ClientFrame::Resume(_)) => {
                self.error(key, rid, ErrorCode::ALREADY_AUTHENTICATED, "already logged in")
            }
            (Phase::Open, _) => self.error(key, rid, ErrorCode::NOT_AUTHENTICATED, "log in first"),
            (Phase::Authed(s), frame) => self.authed_request(key, rid, &s, frame),
        }
    }

    fn authed_request(&mut self, key: usize, rid: u32, s: &Session, frame: ClientFrame) {
        let to = self.to(key, rid);
        let actor = Actor { user_id: s.user_id, name: s.name.clone() };
        let job = match frame {
            ClientFrame::Logout(_) => Job::RevokeSessions { to, actor, which: Some(s.session_id), logout: true },
            ClientFrame::RevokeSessions(r) => Job::RevokeSessions { to, actor, which: r.session, logout: false },
            ClientFrame::ListSessions(l) => Job::ListSessions {
                to,
                online: self.online_sessions(s.user_id),
                actor,
                current: s.session_id,
                after: l.after_session,
                limit: if l.limit == 0 { DEFAULT_PAGE } else { l.limit.min(MAX_PAGE) },
            },
            ClientFrame::CreateRoom(c) => {
                let name = c.name.trim().to_string();
                if name.is_empty() || name.chars().count() > MAX_ROOM_NAME {
                    return self.error(key, rid, ErrorCode::INVALID_ARGUMENT, "room name must be 1 to 100 characters");
                }
                if c.kind != chime_protocol::RoomKind::GROUP {
                    return self.error(key, rid, ErrorCode::INVALID_ARGUMENT, &format!("unknown room kind {}", c.kind));
                }
                if !self.create_per_user.try_take(s.user_id, Instant::now()) {
                    let per_minute = self.config.room_create_per_minute;
                    let message = format!("at most {per_minute} rooms per minute; retry later");
                    return self.error(key, rid, ErrorCode::RATE_LIMITED, &message);
                }
                Job::CreateRoom { to, actor, name, kind: c.kind }
            }
            ClientFrame::JoinRoom(r) => Job::Join { to, actor, room: r.room },
            ClientFrame::LeaveRoom(r) => Job::Leave { to, actor, room: r.room },
            ClientFrame::ListRooms(l) => Job::ListRooms {
                to,
                actor,
                after_room: l.after_room,
                limit: if l.limit == 0 { DEFAULT_PAGE } else { l.limit.min(MAX_PAGE) },
            },
            ClientFrame::ListMembers(m) => Job::ListMembers {
                to,
                actor,
                room: m.room,
                after_user: m.after_user,
                limit: if m.limit == 0 { 500 } else { m.limit.min(1000) },
            },
            ClientFrame::Post(p) => {
                if p.text.is_empty() || p.text.len() > MAX_TEXT {
                    return self.error(key, rid, ErrorCode::INVALID_ARGUMENT, "text must be 1 to 16384 bytes");
                }
                if p.idempotency_key.is_empty() || p.idempotency_key.len() > MAX_KEY {
                    return self.error(key, rid, ErrorCode::INVALID_ARGUMENT, "idempotency key must be 1 to 64 bytes");
                }
                Job::Post {
                    to,
                    post: NewPost {
                        room: p.room,
                        author_id: s.user_id,
                        author: s.name.to_string(),
                        idempotency_key: p.idempotency_key,
                        text: p.text,
                        now_ms: 0,
                    },
                }
            }
            ClientFrame::History(h) => Job::Fetch {
                to,
                actor,
                room: h.room,
                after: h.after,
                limit: if h.limit == 0 { DEFAULT_PAGE } else { h.limit.min(MAX_PAGE) },
                purpose: FetchPurpose::History,
            },
            ClientFrame::Sync(req) => {
                if req.rooms.len() > MAX_SYNC_ROOMS {
                    return self.error(key, rid, ErrorCode::INVALID_ARGUMENT, "at most 1000 rooms per SYNC");
                }
                let Some(conn) = self.conns.get_mut(key) else {
                    return;
                };
                let actions = conn.sync.get_or_insert_with(Default::default).start(rid, &req.rooms, req.page_size);
                self.apply(key, actions);
                return;
            }
            ClientFrame::Hello(_) | ClientFrame::Ping(_) | ClientFrame::Pong(_) => return,
            ClientFrame::Register(_) | ClientFrame::Login(_) | ClientFrame::Resume(_) => return,
        };
        self.submit(key, rid, job);
    }

    fn password(&mut self, key: usize, rid: u32, register: bool, c: chime_protocol::Credentials) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let ip = conn.peer.ip();
        let now = Instant::now();
        if !self.login_per_ip.try_take(ip, now) || !self.login_bucket.try_take(now) {
            return self.error(key, rid, ErrorCode::RATE_LIMITED, "too many logins; retry in a few seconds");
        }
        if let Err(m) = auth::validate_user_name(&c.user) {
            return self.error(key, rid, ErrorCode::INVALID_ARGUMENT, &m);
        }
        if register {
            if let Err(m) = auth::validate_password(&c.password) {
                return self.error(key, rid, ErrorCode::INVALID_ARGUMENT, &m);
            }
        } else if c.password.len() > 1024 {
            return self.error(key, rid, ErrorCode::AUTH_FAILED, "wrong user name or password");
        }
        conn.phase = Phase::Authenticating;
        let ua: String = c.user_agent.chars().take(256).collect();
        let job = Job::Password {
            to: self.to(key, rid),
            register,
            user: c.user,
            password: c.password,
            ip: ip.to_string(),
            user_agent: ua,
        };
        self.submit(key, rid, job);
    }

    fn to(&self, key: usize, request_id: u32) -> ReplyTo {
        let gen = self.conns.get(key).map_or(0, |c| c.id.gen);
        ReplyTo { conn: ConnRef { key, gen }, request_id, shared: false }
    }

    /// Hands a request's job to the pool. A job for the shared queue waits (parked, with the
    /// connection's later frames behind it) while the connection has its window of shared jobs.
    fn submit(&mut self, key: usize, rid: u32, mut job: Job) {
        let shared = job.queue() == Queue::Shared;
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if shared && c.shared_inflight >= SHARED_WINDOW {
            c.parked = Some(Box::new(job));
            return;
        }
        if let Some(to) = job.reply_to_mut() {
            to.shared = shared;
        }
        let authenticating = matches!(job, Job::Password { .. } | Job::Resume { .. });
        let Some(pool) = self.pool.as_ref() else {
            return;
        };
        if pool.health().is_down() {
            // Refused at once rather than queued behind a dead connection; the client retries.
            if authenticating {
                c.phase = Phase::Open;
            }
            return self.error(key, rid, ErrorCode::UNAVAILABLE, "the database is unavailable; retry shortly");
        }
        match pool.submit(job) {
            Ok(()) => {
                c.inflight += 1;
                if shared {
                    c.shared_inflight += 1;
                }
            }
            Err(_) => {
                if authenticating {
                    c.phase = Phase::Open;
                }
                self.error(key, rid, ErrorCode::OVERLOADED, "server busy; retry shortly");
            }
        }
    }

    /// The live connection a completion is for, if it is still there.
    fn conn_for(&mut self, r: ConnRef) -> Option<&mut Conn> {
        self.conns.get_mut(r.key).filter(|c| c.id.gen == r.gen)
    }

    /// A job of the connection finished: its slot is free. Work that waited for the slot goes
    /// now: a parked request, deferred SYNC fetches, frames behind the in-flight cap.
    fn answered(&mut self, to: &ReplyTo) -> bool {
        let key = to.conn.key;
        let Some(c) = self.conn_for(to.conn) else {
            return false;
        };
        c.inflight = c.inflight.saturating_sub(1);
        if to.shared {
            c.shared_inflight = c.shared_inflight.saturating_sub(1);
            if let Some(mut job) = c.parked.take() {
                let rid = job.reply_to_mut().map_or(0, |to| to.request_id);
                self.submit(key, rid, *job);
                self.again.push(key);
            } else {
                self.retry_deferred(key);
            }
        }
        if let Some(c) = self.conns.get_mut(key) {
            if !c.rbuf.is_empty() {
                // Frames paused behind the in-flight cap can go now.
                self.again.push(key);
            }
        }
        true
    }

    fn drain_completions(&mut self) {
        // Bounded per iteration so sockets keep being served under a flood of results.
        for _ in 0..4096 {
            let Ok(done) = self.completions.try_recv() else {
                break;
            };
            self.complete(done);
        }
    }

    fn complete(&mut self, done: Completion) {
        match done {
            Completion::Reply { to, frame } => {
                if self.answered(&to) {
                    if let Some(c) = self.conn_for(to.conn) {
                        if c.phase == Phase::Authenticating {
                            c.phase = Phase::Open;
                        }
                    }
                    self.reply(to.conn.key, frame);
                }
            }
            Completion::LoggedIn { to, user_id, name, session, rooms, frame } => {
                if !self.answered(&to) {
                    return;
                }
                let key = to.conn.key;
                if let Some(c) = self.conn_for(to.conn) {
                    c.phase = Phase::Authed(Session {
                        user_id,
                        name: name.into(),
                        session_id: session.id,
                        session_created_ms: session.created_at_ms,
                    });
                    self.users.entry(user_id).or_default().push(key);
                    self.sessions.entry(session.id).or_default().push(key);
                    // The store lists rooms by id, so each subscription appends to the
                    // connection's sorted room list: linear in the rooms, whatever their number.
                    for (room, head) in rooms {
                        self.subscribe_from(key, room, head);
                    }
                    self.reply(key, frame);
                }
            }
            Completion::SessionsRevoked { to, user_id: _, revoked, logout, frame } => {
                let live = self.answered(&to);
                let requester = to.conn.key;
                if live {
                    if logout {
                        // The connection stays, logged out, and is not told to go.
                        self.logout_conn(requester);
                    }
                    self.reply(requester, frame);
                }
                for session in revoked {
                    for key in self.sessions.get(&session).cloned().unwrap_or_default() {
                        self.end_session(key, ErrorCode::SESSION_REVOKED, "this session was revoked; log in again");
                    }
                }
            }
            Completion::Membership { to, user_id, room, joined, published, frame } => {
                let live = self.answered(&to);
                let conns = self.users.get(&user_id).cloned().unwrap_or_default();
                if joined {
                    // The joiner's view of the log ends just before its JOIN (or CREATE).
                    let after = published.as_ref().map(|p| p.first_seq.saturating_sub(1));
                    for k in &conns {
                        match after {
                            Some(after) => self.subscribe_from(*k, room, after),
                            None => {
                                self.subscribe(*k, room);
                            }
                        }
                    }
                }
                if let Some(p) = &published {
                    self.publish(p);
                }
                if !joined {
                    for k in &conns {
                        self.unsubscribe(*k, room);
                    }
                }
                if live {
                    self.reply(to.conn.key, frame);
                }
            }
            Completion::Batch { published, replies } => {
                // Both are sent only now, after the commit. Acks first: see `flush_dirty`.
                for (to, frame) in replies {
                    if self.answered(&to) {
                        self.reply(to.conn.key, frame);
                    }
                }
                for p in &published {
                    self.publish(p);
                }
            }
            Completion::Page { to, room, fetch, deltas, more } => {
                if !self.answered(&to) {
                    return;
                }
                let Some(c) = self.conn_for(to.conn) else {
                    return;
                };
                let Some(sync) = c.sync.as_mut() else { return };
                let actions = sync.page(room, fetch, deltas, more);
                self.apply(to.conn.key, actions);
            }
            Completion::PageFailed { to, room, fetch, not_member, error } => {
                if !self.answered(&to) {
                    return;
                }
                let Some(c) = self.conn_for(to.conn) else { return };
                let Some(sync) = c.sync.as_mut() else { return };
                let actions =
                    if not_member { sync.skip_room(room, fetch) } else { sync.page_failed(room, fetch, error) };
                self.apply(to.conn.key, actions);
            }
        }
    }

    /// Carries out what the sync state machine asked for.
    fn apply(&mut self, key: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send(bytes) => self.queue(key, bytes, Class::Own),
                Action::Push(bytes) => self.queue(key, bytes, Class::Shared),
                Action::FetchLater { room, after, limit, fetch } => {
                    self.defer(key, Action::Fetch { room, after, limit, fetch })
                }
                fetch @ Action::Fetch { .. } => {
                    if self.can_fetch(key) {
                        self.fetch(key, fetch);
                    } else {
                        self.defer(key, fetch);
                    }
                }
            }
        }
    }

    /// Whether a SYNC fetch of the connection may go to the workers now: the client has read most
    /// of what was sent (flow control), the connection has a free slot of its window on the shared
    /// queue, and the database is there.
    fn can_fetch(&self, key: usize) -> bool {
        let Some(c) = self.conns.get(key) else { return false };
        c.queued_bytes() <= self.config.max_outbound_bytes / 2
            && c.shared_inflight < SHARED_WINDOW
            && self.pool.as_ref().is_some_and(|p| !p.health().is_down())
    }

    /// Submits one SYNC fetch (the caller checked `can_fetch`).
    fn fetch(&mut self, key: usize, fetch: Action) {
        let Action::Fetch { room, after, limit, fetch } = fetch else { return };
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let Some(s) = c.session() else { return };
        let job = Job::Fetch {
            to: ReplyTo { conn: c.id, request_id: 0, shared: true },
            actor: Actor { user_id: s.user_id, name: s.name.clone() },
            room,
            after,
            limit,
            purpose: FetchPurpose::Sync(fetch),
        };
        let Some(pool) = self.pool.as_ref() else {
            return;
        };
        if pool.submit(job).is_err() {
            // The shared queue is full: the client must come back for it.
            self.goodbye(key, ErrorCode::RESYNC_REQUIRED, "server overloaded during sync; reconnect and SYNC");
            return;
        }
        c.inflight += 1;
        c.shared_inflight += 1;
    }

    /// Keeps a SYNC fetch for later (`retry_deferred`), behind the ones already waiting.
    fn defer(&mut self, key: usize, fetch: Action) {
        if let Some(sync) = self.conns.get_mut(key).and_then(|c| c.sync.as_mut()) {
            sync.deferred.push_back(fetch);
        }
    }

    /// Submits the deferred SYNC fetches of a connection, oldest first, while it may; stops at the
    /// first that must still wait, so each call costs what it submits, not what waits (a SYNC of
    /// a thousand rooms defers almost all of them).
    fn retry_deferred(&mut self, key: usize) {
        while self.can_fetch(key) {
            let Some(sync) = self.conns.get_mut(key).and_then(|c| c.sync.as_mut()) else { return };
            let Some(next) = sync.deferred.pop_front() else { return };
            // A fetch a newer one replaced need not run.
            if let Action::Fetch { room, fetch, .. } = next {
                if sync.wants(room, fetch) {
                    self.fetch(key, next);
                }
            }
        }
    }

    /// Subscribes a connection to a room's pushes. Returns whether it was not subscribed yet.
    fn subscribe(&mut self, key: usize, room: u64) -> bool {
        let Some(c) = self.conns.get_mut(key) else {
            return false;
        };
        let Err(at) = c.rooms.binary_search(&room) else {
            return false;
        };
        c.rooms.insert(at, room);
        self.rooms.entry(room).or_default().push(key);
        true
    }

    /// Subscribes a connection that knows the room's log up to `after`. Deltas the loop published
    /// before this subscription and after `after` were not sent to it: it catches up on them
    /// (a page fetch, with live pushes held meanwhile) so that it sees no gap.
    fn subscribe_from(&mut self, key: usize, room: u64, after: u64) {
        if !self.subscribe(key, room) {
            // Already subscribed: it has received every push since, so there is nothing to catch up.
            return;
        }
        if self.room_heads.get(&room).is_some_and(|&head| head > after) {
            let Some(c) = self.conns.get_mut(key) else { return };
            let actions = c.sync.get_or_insert_with(Default::default).catch_up(room, after);
            self.apply(key, actions);
        }
    }

    fn unsubscribe(&mut self, key: usize, room: u64) {
        let mut actions = Vec::new();
        if let Some(c) = self.conns.get_mut(key) {
            if let Ok(at) = c.rooms.binary_search(&room) {
                c.rooms.remove(at);
            }
            if let Some(s) = c.sync.as_mut() {
                // A SYNC still open may now be complete.
                actions = s.forget(room);
            }
        }
        remove_subscriber(&mut self.rooms, room, key);
        self.apply(key, actions);
    }

    /// Ends a logged-in connection whose session ended: whatever it was owed and not yet sent
    /// is dropped (the session no longer gives access to it), then GOODBYE and close.
    fn end_session(&mut self, key: usize, code: ErrorCode, message: &str) {
        self.logout_conn(key);
        if let Some(c) = self.conns.get_mut(key) {
            // Replies queued just before (the revoking request's own answer) still go out first.
            c.goodbye_after_queue(code, message);
            self.totals.reconcile(c);
            self.mark_dirty(key);
        }
    }

    /// The sessions of `user` that have a live connection.
    fn online_sessions(&self, user: u64) -> Vec<SessionId> {
        let mut online: Vec<SessionId> = self
            .users
            .get(&user)
            .into_iter()
            .flatten()
            .filter_map(|&k| self.conns.get(k).and_then(|c| c.session()).map(|s| s.session_id))
            .collect();
        online.sort_unstable();
        online.dedup();
        online
    }

    fn logout_conn(&mut self, key: usize) {
        let now = self.now_secs;
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let rooms = std::mem::take(&mut c.rooms);
        let user = c.session().map(|s| s.user_id);
        let session = c.session().map(|s| s.session_id);
        c.phase = Phase::Open;
        c.unauth_since = now;
        c.sync = None;
        for room in rooms {
            remove_subscriber(&mut self.rooms, room, key);
        }
        if let Some(uid) = user {
            remove_key(&mut self.users, uid, key);
        }
        if let Some(session) = session {
            remove_key(&mut self.sessions, session, key);
            // Its last use is now: idle expiry counts from here.
            self.touched.push(session);
        }
    }

    /// Fan-out of one committed batch of a room's deltas to every online member.
    fn publish(&mut self, p: &Published) {
        let head = self.room_heads.entry(p.room).or_insert(0);
        *head = (*head).max(p.last_seq());
        let Some(subs) = self.rooms.get(&p.room) else { return };
        let limit = self.config.max_outbound_bytes;
        let mut fetches = Vec::new();
        for &key in subs {
            let Some(c) = self.conns.get_mut(key) else {
                continue;
            };
            let ok = match c.sync.as_mut() {
                None => c.queue(p.frames.clone(), Class::Shared, limit),
                Some(sync) => {
                    let mut ok = true;
                    for a in sync.push(p) {
                        match a {
                            Action::Send(b) => ok &= c.queue(b, Class::Own, limit),
                            Action::Push(b) => ok &= c.queue(b, Class::Shared, limit),
                            // Rare (a gap in live pushes); applied after the fan-out.
                            fetch @ (Action::Fetch { .. } | Action::FetchLater { .. }) => fetches.push((key, fetch)),
                        }
                    }
                    ok
                }
            };
            if !ok {
                c.goodbye(ErrorCode::RESYNC_REQUIRED, "you fell too far behind; reconnect and SYNC", true);
            }
            self.totals.reconcile(c);
            mark_dirty(&mut self.dirty, c, key);
        }
        for (key, fetch) in fetches {
            self.apply(key, vec![fetch]);
        }
    }

    /// Queues a frame on a connection; one that overflows the connection's queue ends it with a
    /// resync.
    fn queue(&mut self, key: usize, frame: Bytes, class: Class) {
        let limit = self.config.max_outbound_bytes;
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if !c.queue(frame, class, limit) {
            c.goodbye(ErrorCode::RESYNC_REQUIRED, "you fell too far behind; reconnect and SYNC", true);
        }
        self.totals.reconcile(c);
        self.mark_dirty(key);
    }

    fn reply(&mut self, key: usize, frame: Bytes) {
        self.queue(key, frame, Class::Own);
    }

    fn error(&mut self, key: usize, rid: u32, code: ErrorCode, message: &str) {
        self.reply(key, ServerFrame::Error(ErrorBody::new(code, message)).reply(rid));
    }

    /// An ERROR for the request, then a GOODBYE with the same reason, then close.
    fn error_and_close(&mut self, key: usize, rid: u32, code: ErrorCode, message: &str) {
        self.error(key, rid, code, message);
        if let Some(c) = self.conns.get_mut(key) {
            c.goodbye_after_queue(code, message);
            self.totals.reconcile(c);
        }
    }

    /// Replaces what is queued with a GOODBYE and closes after it.
    fn goodbye(&mut self, key: usize, code: ErrorCode, message: &str) {
        if let Some(c) = self.conns.get_mut(key) {
            c.goodbye(code, message, code == ErrorCode::RESYNC_REQUIRED);
            self.totals.reconcile(c);
            self.mark_dirty(key);
        }
    }

    /// Schedules a connection for the flush at the end of this loop iteration (once).
    fn mark_dirty(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            mark_dirty(&mut self.dirty, c, key);
        }
    }

    fn flush_dirty(&mut self) {
        // In the order they were first queued to: POSTED replies are queued before the fan-out
        // of the same batch, so authors hear their ack before a thousand recipients are served.
        let mut dirty = std::mem::take(&mut self.dirty);
        let resume_below = self.config.max_outbound_bytes / 4;
        let over_budget = self.over_budget();
        let now = self.now_secs;
        for key in dirty.drain(..) {
            let Some(c) = self.conns.get_mut(key) else { continue };
            c.dirty = false;
            let flushed = c.flush(now);
            self.totals.reconcile(c);
            if let Err(e) = flushed {
                log::debug!("write to {} failed: {e}", c.peer);
                self.close(key);
                continue;
            }
            if c.closing && !c.has_pending_output() {
                self.close(key);
                continue;
            }
            if c.cost() < resume_below {
                if c.read_paused && may_read(c, self.config.max_outbound_bytes, over_budget) {
                    c.read_paused = false;
                    self.again.push(key);
                }
                self.retry_deferred(key);
            }
        }
        // Connections queued for a flush while flushing (deferred sync fetches) go next time.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    /// The server-wide outbound budget: what connections hold alone plus every published batch
    /// still alive. Over `max_outbound_total_bytes`, the connections holding the most (above
    /// `FAIR_SHARE`) are cut off with a resync, largest first, until the total fits again.
    fn enforce_budget(&mut self) {
        let max = self.config.max_outbound_total_bytes;
        if !self.over_budget() {
            return;
        }
        let now = Instant::now();
        if self.last_enforced.is_some_and(|t| now.duration_since(t) < Duration::from_millis(100)) {
            return;
        }
        self.last_enforced = Some(now);
        let mut big: Vec<(usize, usize)> =
            self.conns.iter().filter(|(_, c)| c.memory() > FAIR_SHARE).map(|(k, c)| (c.memory(), k)).collect();
        big.sort_unstable_by(|a, b| b.cmp(a));
        let mut cut = 0;
        for (_, key) in big {
            if !self.over_budget() {
                break;
            }
            let Some(c) = self.conns.get_mut(key) else { continue };
            cut += 1;
            if c.closing {
                self.close(key);
            } else {
                c.goodbye(ErrorCode::RESYNC_REQUIRED, "server outbound budget exceeded; reconnect and SYNC", true);
                self.totals.reconcile(c);
                self.mark_dirty(key);
            }
        }
        log::warn!(
            "outbound queues over the server-wide budget of {max} bytes: cut off {cut} connections \
             (now {} bytes held by connections, {} by published batches)",
            self.totals.own,
            published_bytes()
        );
    }

    /// Once a second: heartbeats; idle, handshake, login and write timeouts; retries of failed
    /// SYNC fetches; memory given back.
    fn tick(&mut self) {
        let now = self.now_secs;
        let now_ms = chime_storage::now_ms();
        let max_age_ms = session_limits(&self.config).max_age_ms;
        let hb = self.config.heartbeat_secs.max(1);
        let auth_timeout = self.config.auth_timeout_secs;
        let write_timeout = self.config.write_timeout_secs;
        let mut to_close = Vec::new();
        let mut to_ping = Vec::new();
        let mut to_retry = Vec::new();
        let mut expired = Vec::new();
        let mut to_resume = Vec::new();
        let max_outbound = self.config.max_outbound_bytes;
        let over_budget = self.over_budget();
        for (key, c) in self.conns.iter_mut() {
            c.shrink_idle();
            if c.stalled_since.is_some_and(|since| now.saturating_sub(since) >= write_timeout) {
                // Nothing it was sent has been read for the whole timeout (a zero window, or a
                // peer that stopped reading): a GOODBYE would not be read either.
                log::info!("closing {}: nothing written for {write_timeout} s", c.peer);
                to_close.push(key);
                continue;
            }
            let quiet = now.saturating_sub(c.last_heard);
            if c.session().is_some_and(|s| now_ms.saturating_sub(s.session_created_ms) > max_age_ms) && !c.closing {
                expired.push(key);
            }
            match c.phase {
                Phase::Handshake if quiet >= HANDSHAKE_SECS => to_close.push(key),
                _ if c.closing => {}
                Phase::Open | Phase::Authenticating if now.saturating_sub(c.unauth_since) >= auth_timeout => {
                    c.goodbye(ErrorCode::AUTH_TIMEOUT, "not logged in within the server's deadline", false);
                    mark_dirty(&mut self.dirty, c, key);
                }
                _ if quiet >= 3 * hb => {
                    c.goodbye(ErrorCode::IDLE_TIMEOUT, "nothing heard within the idle timeout", false);
                    mark_dirty(&mut self.dirty, c, key);
                }
                _ if quiet >= hb && !c.ping_sent && c.phase != Phase::Handshake => {
                    c.ping_sent = true;
                    to_ping.push(key);
                }
                _ => {}
            }
            // A timeout above may have replaced the queue with a GOODBYE.
            self.totals.reconcile(c);
            if c.read_paused && !c.closing && c.cost() < max_outbound / 4 && may_read(c, max_outbound, over_budget) {
                // Paused while the server was over its budget, with nothing queued to flush.
                c.read_paused = false;
                to_resume.push(key);
            }
            if c.sync.as_ref().is_some_and(|s| !s.deferred.is_empty()) {
                to_retry.push(key);
            }
        }
        for key in to_close {
            self.close(key);
        }
        for key in expired {
            self.end_session(key, ErrorCode::SESSION_EXPIRED, "this session reached its lifetime; log in again");
        }
        self.touch_sessions(now.is_multiple_of(TOUCH_LIVE_EVERY));
        for key in to_ping {
            self.reply(key, ServerFrame::Ping(Ping { nonce: u64::from(now) }).reply(0));
        }
        for key in to_retry {
            self.retry_deferred(key);
        }
        self.again.extend(to_resume);
        self.flush_dirty();
        self.give_back_memory();
    }

    /// Records the last use of the sessions whose connections closed (in this loop iteration: one
    /// job for a mass disconnect), and with `all` of every session still connected, in one job
    /// nobody waits for.
    fn touch_sessions(&mut self, all: bool) {
        if all {
            self.touched.extend(self.sessions.keys().copied());
        }
        if self.touched.is_empty() {
            return;
        }
        let Some(pool) = self.pool.as_ref() else { return };
        let mut sessions = std::mem::take(&mut self.touched);
        sessions.sort_unstable();
        sessions.dedup();
        if pool.health().is_down() {
            // Kept for a later tick: the database is away, and these are only timestamps.
            self.touched = sessions;
            return;
        }
        if pool.submit(Job::TouchSessions { sessions }).is_err() {
            log::debug!("could not queue the last use of closed sessions");
        }
    }

    /// Returns freed heap to the OS after a lot of outbound memory was released (many slow
    /// consumers leaving, say): the allocator keeps freed pages otherwise, and the process would
    /// stay at its peak.
    fn give_back_memory(&mut self) {
        let total = self.totals.own + published_bytes();
        let peak = self.totals.peak.max(total);
        if peak - total >= TRIM_AFTER {
            trim_heap();
            self.totals.peak = total;
        }
    }

    fn close(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        self.logout_conn(key);
        let mut c = self.conns.remove(key);
        self.totals.release(&c);
        let source = ip_key(c.peer.ip());
        if let Some(n) = self.per_ip.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&source);
            }
        }
        c.close_notify();
        let _ = self.poll.registry().deregister(c.socket());
        log::debug!("connection {key} from {} closed", c.peer);
    }
}

/// Whether a connection may be read: not while its unread replies cost more than half its limit
/// (replies it does not read stop it from asking for more), nor, while the server is over its
/// outbound budget, while it holds more than `FAIR_SHARE` (it would only add to the excess).
fn may_read(c: &Conn, max_outbound: usize, over_budget: bool) -> bool {
    c.cost() <= max_outbound / READ_PAUSE_DIVISOR && !(over_budget && c.own_cost() > FAIR_SHARE)
}

/// What all connections' buffers cost together (their `Conn::own_cost`; published batches are
/// counted apart, once each, by `published_bytes`).
#[derive(Debug, Default)]
struct Totals {
    /// The sum, exact after each `reconcile`.
    own: usize,
    /// The highest `own` plus published bytes since memory was last given back to the OS.
    peak: usize,
}

impl Totals {
    /// Brings the sum up to date with `c`'s current cost; called after anything that changes a
    /// connection's buffers (a read, a queued frame, a flush, a GOODBYE).
    fn reconcile(&mut self, c: &mut Conn) {
        let now = c.own_cost();
        self.own = self.own.saturating_sub(c.counted_cost) + now;
        c.counted_cost = now;
        self.peak = self.peak.max(self.own);
    }

    /// Takes a closed connection out of the sum.
    fn release(&mut self, c: &Conn) {
        self.own = self.own.saturating_sub(c.counted_cost);
    }
}

/// The key connections are counted under per source: the address for IPv4, the /64 prefix for
/// IPv6 (one subscriber typically holds a whole /64, so per-address limits would mean nothing).
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

/// Asks the allocator to give free memory back to the OS (glibc keeps freed pages in its arenas).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers from us
    // and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// Takes connection `key` off the list under `id` (a user's or a session's connections),
/// dropping the list once it is empty.
fn remove_key(lists: &mut HashMap<u64, Vec<usize>>, id: u64, key: usize) {
    if let Some(list) = lists.get_mut(&id) {
        list.retain(|&k| k != key);
        if list.is_empty() {
            lists.remove(&id);
        }
    }
}

/// When sessions expire, from the configuration.
fn session_limits(config: &Config) -> SessionLimits {
    let ms = |secs: u64| i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    SessionLimits { idle_ms: ms(config.session_idle_secs), max_age_ms: ms(config.session_max_age_secs) }
}

/// Takes connection `key` off `room`'s subscriber list, dropping the list once it is empty.
fn remove_subscriber(rooms: &mut HashMap<u64, Vec<usize>>, room: u64, key: usize) {
    if let Some(subs) = rooms.get_mut(&room) {
        if let Some(i) = subs.iter().position(|&k| k == key) {
            subs.swap_remove(i);
        }
        if subs.is_empty() {
            rooms.remove(&room);
        }
    }
}

/// Adds `c` (at `key`) to the flush list unless it is there already.
fn mark_dirty(dirty: &mut Vec<usize>, c: &mut Conn, key: usize) {
    if !c.dirty {
        c.dirty = true;
        dirty.push(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_or_ipv6_prefixes() {
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(ip_key(v4), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(other));
        assert_eq!(ip_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(ip_key(mapped), v4);
    }
}
