//! The event loop: one `mio` thread that owns every socket and moves bytes.
//!
//! The loop accepts connections (per-address cap, accept rate), reads and decodes frames, and
//! hands each to the core (`core::Core`), which decides everything about the protocol. It
//! delivers the pool's completions to the core, flushes what the core queued, and runs the
//! transport's own policies: what a connection's buffers may cost, reading paused while replies go
//! unread, the write timeout, and the server-wide budget for all outbound queues together. It never
//! blocks: sockets are non-blocking, jobs are queued with `try_send` (a full queue is an
//! OVERLOADED reply), and the pool wakes the loop through a `mio::Waker` when results are ready.
//!
//! Fan-out: a published batch of deltas is one shared buffer; the core queues a reference to it
//! on every recipient's transport and the loop marks it dirty. Dirty connections are flushed once
//! at the end of each loop iteration, so everything that arrived in one iteration leaves in one
//! vectored write per connection.
//!
//! Life of a message: socket -> `Transport::read` -> `FrameDecoder` -> `Core::frame` ->
//! `handlers::messages::post` -> a post job on the room's shard -> group commit -> effects ->
//! `Core::completion`: `POSTED` to the author and the deltas to every subscriber -> `flush`.

use crate::config::{redact_database_url, Config};
use crate::content::Content;
use crate::core::{Bye, Core, Flow, Io, Now};
use crate::limits::{FAIR_SHARE, READ_PAUSE_DIVISOR, SHUTDOWN_GRACE, TRIM_AFTER};
use crate::node::{LinkOptions, Nodes};
use crate::ratelimit::TokenBucket;
use crate::tls::{fingerprint_hex, TlsSetup};
use crate::transport::{Class, ReadOutcome, Transport};
use crate::work::{published_bytes, Completion, ConnRef, EncodeReply, Settings, Work};
use crate::worker::{Notify, Pool, PoolConfig};
use anyhow::Context as _;
use bytes::Bytes;
use chime_protocol::{DecodeError, ErrorBody, ErrorCode, FrameDecoder, ServerFrame};
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
    /// Accepted connections' transports by `token - FIRST_CONN`.
    conns: Slab<Transport>,
    /// Everything about the connections that is not bytes.
    core: Core,
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
    /// Connections to read or decode again next iteration (read budget used up, frames waiting
    /// behind something the core waited for).
    again: Vec<usize>,
    /// Connections the core asked to close now.
    to_close: Vec<usize>,
    accept_bucket: TokenBucket,
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
    /// The content store (file bytes: cache and nodes). Its own thread moves content to nodes;
    /// the file threads of the transfer path take a clone of this Arc.
    content: Arc<Content>,
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

/// Opens the content store of `config` (`[files]`, `[[node]]`): the cache directory (default
/// `DATA_DIR/cache`), its quota, the nodes (nothing is connected until content moves).
pub fn open_content(config: &Config) -> anyhow::Result<Arc<Content>> {
    let dir = config.cache_dir();
    let nodes = Arc::new(Nodes::from_config(config, &LinkOptions::default()));
    let content = Content::open(&dir, config.files.cache_quota, nodes)
        .with_context(|| format!("cannot open the file cache {}", dir.display()))?;
    content.set_rebalance_interval(Duration::from_secs(config.files.rebalance_interval_secs));
    Ok(Arc::new(content))
}

impl Server {
    /// The content store, for the threads that move file bytes.
    pub fn content(&self) -> &Arc<Content> {
        &self.content
    }

    /// Binds the listeners and starts the worker pool.
    pub fn bind(config: Config, database_url: &str, tls: Option<TlsSetup>) -> anyhow::Result<Server> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, completions) = crossbeam_channel::bounded(16_384);
        // File bytes: the cache directory, and the storage nodes content moves to.
        let content = open_content(&config)?;
        let pool_config = PoolConfig {
            workers: config.workers,
            auth_workers: config.auth_workers,
            max_batch: config.max_batch,
            busy_timeout: Duration::from_millis(config.database_busy_timeout_ms),
            partition_size: config.partition_size,
            settings: Settings {
                max_rooms_per_user: config.max_rooms_per_user,
                session_limits: crate::core::session_limits(&config),
                notifier: match &config.notify.spool {
                    Some(path) => {
                        let gateway = crate::notify::SpoolGateway::open(path)
                            .with_context(|| format!("cannot open the notification spool {}", path.display()))?;
                        let delay = Duration::from_millis(config.notify.delay_ms);
                        Some(crate::notify::Notifier::start(delay, Box::new(gateway))?)
                    }
                    None => None,
                },
                content: Some(crate::work::ContentRef(content.clone())),
            },
            secret_keys: Some(config.data_dir.join("secret-keys")),
        };
        let pool = Pool::start(database_url, pool_config, Notify { completions: tx, waker })?;
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
            content,
            decoder: FrameDecoder::new(config.max_frame),
            accept_bucket: TokenBucket::new(config.accept_rate, config.accept_rate, now),
            core: Core::new(config.clone(), now),
            config,
            poll,
            conns: Slab::new(),
            pool: Some(pool),
            completions,
            tls_listener,
            plain_listener,
            tls_config,
            signals,
            scratch: vec![0u8; 64 * 1024].into_boxed_slice(),
            dirty: Vec::new(),
            again: Vec::new(),
            to_close: Vec::new(),
            per_ip: HashMap::new(),
            totals: Totals::default(),
            last_enforced: None,
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
            if self.now_secs != self.last_tick {
                self.last_tick = self.now_secs;
                self.tick();
            }
            // After every close of this turn: a session's last use is recorded before the loop
            // can take a RESUME of it that arrives later.
            let (core, mut io) = self.split();
            core.touch_sessions(&mut io);
            if self.accept_paused {
                self.accept_all();
            }
            if self.shutdown_deadline.is_some() && self.shutdown_step() {
                break;
            }
        }
        // Every connection is closed by now: their sessions' last use is now.
        let (core, mut io) = self.split();
        core.touch_sessions(&mut io);
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

    /// The time for this turn.
    fn now(&self) -> Now {
        Now { secs: self.now_secs, instant: Instant::now(), ms: chime_storage::now_ms() }
    }

    /// The core, and the loop's side of it.
    fn split(&mut self) -> (&mut Core, LoopIo<'_>) {
        let io = LoopIo {
            conns: &mut self.conns,
            dirty: &mut self.dirty,
            again: &mut self.again,
            to_close: &mut self.to_close,
            totals: &mut self.totals,
            pool: self.pool.as_ref(),
            max_outbound: self.config.max_outbound_bytes,
        };
        (&mut self.core, io)
    }

    /// Closes what the core asked to close.
    fn close_requested(&mut self) {
        while let Some(key) = self.to_close.pop() {
            self.close(key);
        }
    }

    fn on_signal(&mut self) {
        let got: Vec<i32> = self.signals.pending().collect();
        if got.is_empty() || self.shutdown_deadline.is_some() {
            return;
        }
        log::info!("signal {got:?}: stopping (no new connections; finishing requests in flight)");
        self.shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
        self.core.shut_down();
        // Dropping a listener closes it: new connections are refused from here on.
        for mut l in [self.tls_listener.take(), self.plain_listener.take()].into_iter().flatten() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_paused = false;
    }

    /// One step of a graceful shutdown. Returns true when the loop may end.
    fn shutdown_step(&mut self) -> bool {
        let deadline = self.shutdown_deadline.unwrap_or_else(Instant::now);
        if self.core.busy() && Instant::now() < deadline {
            return false;
        }
        // Nothing in flight: every acknowledged write is committed. Say goodbye and close.
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in &keys {
            if let Some(c) = self.conns.get_mut(*key) {
                c.goodbye_after_queue(ErrorCode::SHUTTING_DOWN, "server shutting down; reconnect later");
                mark_dirty(&mut self.dirty, c, *key);
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
        let mut conn = Transport::new(id, sock, peer, tls);
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
        let now = self.now();
        self.core.open(id, peer.ip(), now);
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
        let mut outcome = ReadOutcome::Drained;
        if readable && !conn.closing {
            if !may_read(conn, max_outbound, over_budget) {
                // Its replies are not being read: reading more requests would only queue more.
                // `flush_dirty` reads again once the queue has drained.
                conn.read_paused = true;
            } else {
                outcome = conn.read(&mut self.scratch, max_buffered);
                self.totals.reconcile(conn);
                if matches!(outcome, ReadOutcome::More) {
                    self.again.push(key);
                }
            }
            // TLS handshakes write during reads.
            mark_dirty(&mut self.dirty, conn, key);
        }
        if writable {
            mark_dirty(&mut self.dirty, conn, key);
        }
        self.process_frames(key);
        match outcome {
            ReadOutcome::Failed => self.close(key),
            ReadOutcome::Eof => {
                // The client sent all it will send: what it asked for is still owed to it.
                let (core, mut io) = self.split();
                core.read_closed(&mut io, key);
            }
            ReadOutcome::Drained | ReadOutcome::More => {}
        }
        self.close_requested();
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
            if conn.closing || conn.read_paused || conn.tls_handshaking() {
                break;
            }
            let raw = match self.decoder.decode(&mut conn.rbuf) {
                Ok(None) => break,
                Ok(Some(raw)) => raw,
                Err(e) => {
                    // A bad length loses frame boundaries: answer and close.
                    let code = match e {
                        DecodeError::TooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
                        _ => ErrorCode::BAD_FRAME,
                    };
                    log::debug!("closing {}: {e}", conn.peer);
                    let error = ServerFrame::Error(ErrorBody::new(code, e.to_string())).reply(0);
                    conn.queue(error, Class::Own, max_outbound);
                    conn.goodbye_after_queue(code, &e.to_string());
                    self.totals.reconcile(conn);
                    mark_dirty(&mut self.dirty, conn, key);
                    break;
                }
            };
            let now = self.now();
            let (core, mut io) = self.split();
            if core.frame(&mut io, key, raw, now) == Flow::Stop {
                break;
            }
        }
        if let Some(conn) = self.conns.get_mut(key) {
            conn.shrink_read_buffer();
            self.totals.reconcile(conn);
        }
    }

    fn drain_completions(&mut self) {
        // Bounded per iteration so sockets keep being served under a flood of results.
        for _ in 0..4096 {
            let Ok(done) = self.completions.try_recv() else {
                break;
            };
            let now = self.now();
            let (core, mut io) = self.split();
            core.completion(&mut io, done, now);
        }
        self.close_requested();
    }

    fn flush_dirty(&mut self) {
        // In the order they were first queued to: POSTED replies are queued before the fan-out
        // of the same batch, so authors hear their ack before a thousand recipients are served.
        let mut dirty = std::mem::take(&mut self.dirty);
        let resume_below = self.config.max_outbound_bytes / 4;
        let over_budget = self.over_budget();
        let now = self.now_secs;
        let mut drained = Vec::new();
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
                drained.push(key);
            }
        }
        // SYNC pages wait for the client to drain what it was sent (flow control).
        for key in drained {
            let (core, mut io) = self.split();
            core.retry_deferred(&mut io, key);
        }
        // Connections queued for a flush while flushing (deferred sync fetches) go next time.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    fn over_budget(&self) -> bool {
        self.totals.own + published_bytes() > self.config.max_outbound_total_bytes
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
                mark_dirty(&mut self.dirty, c, key);
            }
        }
        log::warn!(
            "outbound queues over the server-wide budget of {max} bytes: cut off {cut} connections \
             (now {} bytes held by connections, {} by published batches)",
            self.totals.own,
            published_bytes()
        );
    }

    /// Once a second: the transports' write timeout and memory, then the core's timers.
    fn tick(&mut self) {
        let now = self.now_secs;
        let write_timeout = self.config.write_timeout_secs;
        let max_outbound = self.config.max_outbound_bytes;
        let over_budget = self.over_budget();
        let mut to_close = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            c.shrink_idle();
            self.totals.reconcile(c);
            if c.stalled_since.is_some_and(|since| now.saturating_sub(since) >= write_timeout) {
                // Nothing it was sent has been read for the whole timeout (a zero window, or a
                // peer that stopped reading): a GOODBYE would not be read either.
                log::info!("closing {}: nothing written for {write_timeout} s", c.peer);
                to_close.push(key);
                continue;
            }
            if c.read_paused && !c.closing && c.cost() < max_outbound / 4 && may_read(c, max_outbound, over_budget) {
                // Paused while the server was over its budget, with nothing queued to flush.
                c.read_paused = false;
                self.again.push(key);
            }
        }
        for key in to_close {
            self.close(key);
        }
        let now = self.now();
        let (core, mut io) = self.split();
        core.tick(&mut io, now);
        self.close_requested();
        self.flush_dirty();
        self.give_back_memory();
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
        self.core.closed(key);
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

/// The loop's side of the core: its transports, flush list and the pool.
struct LoopIo<'a> {
    conns: &'a mut Slab<Transport>,
    dirty: &'a mut Vec<usize>,
    again: &'a mut Vec<usize>,
    to_close: &'a mut Vec<usize>,
    totals: &'a mut Totals,
    pool: Option<&'a Pool>,
    max_outbound: usize,
}

impl Io for LoopIo<'_> {
    fn send(&mut self, key: usize, bytes: Bytes, class: Class) {
        let Some(c) = self.conns.get_mut(key) else { return };
        if !c.queue(bytes, class, self.max_outbound) {
            c.goodbye(ErrorCode::RESYNC_REQUIRED, "you fell too far behind; reconnect and SYNC", true);
        }
        self.totals.reconcile(c);
        mark_dirty(self.dirty, c, key);
    }

    fn queued(&self, key: usize) -> usize {
        self.conns.get(key).map_or(0, Transport::queued_bytes)
    }

    fn goodbye(&mut self, key: usize, code: ErrorCode, message: &str, bye: Bye) {
        let Some(c) = self.conns.get_mut(key) else { return };
        match bye {
            Bye::Replace { resync } => c.goodbye(code, message, resync),
            Bye::AfterQueue => c.goodbye_after_queue(code, message),
        }
        self.totals.reconcile(c);
        mark_dirty(self.dirty, c, key);
    }

    fn finish(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else { return };
        c.finish();
        self.totals.reconcile(c);
        mark_dirty(self.dirty, c, key);
    }

    fn close(&mut self, key: usize) {
        self.to_close.push(key);
    }

    fn submit(&mut self, work: Work) -> bool {
        self.pool.is_some_and(|p| p.submit(work).is_ok())
    }

    fn db_down(&self) -> bool {
        self.pool.is_some_and(|p| p.health().is_down())
    }

    fn wake(&mut self, key: usize) {
        if self.conns.get(key).is_some_and(|c| !c.rbuf.is_empty()) {
            self.again.push(key);
        }
    }
}

/// Whether a connection may be read: not while its unread replies cost more than half its limit
/// (replies it does not read stop it from asking for more), nor, while the server is over its
/// outbound budget, while it holds more than `FAIR_SHARE` (it would only add to the excess).
fn may_read(c: &Transport, max_outbound: usize, over_budget: bool) -> bool {
    c.cost() <= max_outbound / READ_PAUSE_DIVISOR && !(over_budget && c.own_cost() > FAIR_SHARE)
}

/// What all connections' buffers cost together (their `Transport::own_cost`; published batches
/// are counted apart, once each, by `published_bytes`).
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
    fn reconcile(&mut self, c: &mut Transport) {
        let now = c.own_cost();
        self.own = self.own.saturating_sub(c.counted_cost) + now;
        c.counted_cost = now;
        self.peak = self.peak.max(self.own);
    }

    /// Takes a closed connection out of the sum.
    fn release(&mut self, c: &Transport) {
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

/// Adds `c` (at `key`) to the flush list unless it is there already.
fn mark_dirty(dirty: &mut Vec<usize>, c: &mut Transport, key: usize) {
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
