//! `chime-load`: a load generator for `chimed`.
//!
//! Setup uses the blocking client from parallel threads: it registers a few users per room (a
//! password login costs an argon2 hash and is rate limited server-side), each room's first user
//! creates the room and the others join. Then C connections log in with RESUME on those users'
//! tokens (sessions are per token; one token may be resumed by many connections), spread evenly
//! over the rooms, on a few `mio` threads, each a [`chime_client::nonblocking::Connection`] (the
//! same session as every other client: request ids, reply matching, server pings answered). S of
//! them post, at a fixed rate or closed loop. Every connection records the pushes it gets:
//! deliveries per second, POST-ack and post-to-publish latency (the text carries the send time),
//! and per-room seq ledgers for loss and duplicates. The connections follow no room, so the
//! session hands pushes over as they arrive and fills no gaps: a loss must show in the ledgers,
//! not be repaired behind the measurement's back.
//! With `--idle` the connections only log in and stay, to measure memory per connection.
//! `CHIME_LOAD_DEBUG=1` prints the seq ledger of every receiver that missed a delivery.

use anyhow::{anyhow, bail, Context, Result};
use chime_client::blocking::{Client, ClientError, ConnectOptions};
use chime_client::nonblocking::{Connection, TlsSetup};
use chime_client::{Event, SessionConfig, SessionError};
use chime_protocol::{ClientFrame, ErrorCode, Post, Resume, RoomId, ServerFrame};
use chime_tests::load::accounting::{SeqLedger, Tally};
use chime_tests::load::latency::{self, Summary};
use chime_tests::load::stamp::Stamp;
use clap::Parser;
use hdrhistogram::Histogram;
use mio::{Events, Poll, Token};
use rustls::pki_types::ServerName;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Load generator for chimed (loopback only unless --allow-remote).
#[derive(Parser, Debug, Clone)]
#[command(name = "chime-load", version)]
struct Args {
    /// The server's address (HOST:PORT), plaintext unless --tls.
    #[arg(long, default_value = "127.0.0.1:7879")]
    server: String,
    /// Speak TLS (trust on first use: the first certificate seen is pinned for the run).
    #[arg(long)]
    tls: bool,
    /// Connections to open.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Rooms to spread the connections over.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// How many of the connections post.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Messages per second per sender; 0 = closed loop (post the next once the last is acked).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Only open the connections, log in, and hold them for --duration.
    #[arg(long)]
    idle: bool,
    /// The daemon's pid, to report its resident memory per connection.
    #[arg(long)]
    daemon_pid: Option<u32>,
    /// Print one JSON summary object on stdout.
    #[arg(long)]
    json: bool,
    /// Prefix of the user and room names (unique per run by default).
    #[arg(long)]
    user_prefix: Option<String>,
    /// Distinct users per room (connections of a room share them round-robin).
    #[arg(long, default_value_t = 1)]
    users_per_room: usize,
    /// Event-loop threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Pad message texts to this many bytes.
    #[arg(long, default_value_t = 0)]
    message_size: usize,
    /// Most posts a sender keeps unacknowledged in rate mode (beyond it, sends are skipped).
    #[arg(long, default_value_t = 1000)]
    max_in_flight: usize,
    /// Password of the generated users.
    #[arg(long, default_value = "chime-load password")]
    password: String,
    /// Allow a non-loopback --server.
    #[arg(long)]
    allow_remote: bool,
}

/// The shared state of one room during the run.
struct RoomState {
    /// Server id.
    id: u64,
    /// Highest acked seq, from any sender (receivers drain up to it).
    max_acked: AtomicU64,
}

/// What every event-loop thread shares.
struct Shared {
    args: Args,
    addr: SocketAddr,
    tls: Option<TlsSetup>,
    rooms: Vec<RoomState>,
    /// Tokens per room, one per user.
    tokens: Vec<Vec<String>>,
    /// The run's clock origin; stamps are nanoseconds since it.
    epoch: Instant,
    /// Connections logged in.
    ready: AtomicUsize,
    /// Connections that failed to connect or log in.
    failed: AtomicUsize,
    /// Set by main once every connection is set up: nanos since epoch when load starts.
    start_ns: AtomicU64,
    /// Set by main to stop everything early (setup failure).
    abort: AtomicBool,
    /// Posts sent and not yet answered, over all threads: receivers keep draining until it is 0,
    /// or a thread could stop reading before another thread's last post is acked and published.
    posts_in_flight: AtomicU64,
}

/// What one thread measured.
#[derive(Default)]
struct ThreadReport {
    /// Per connection: its room index and its ledger.
    ledgers: Vec<(usize, SeqLedger)>,
    /// Pushes received inside the measured window.
    window_deliveries: u64,
    /// POST-ack latency of posts sent in the window (µs).
    ack: Option<Histogram<u64>>,
    /// Post-to-publish latency of deliveries of posts sent in the window (µs).
    publish: Option<Histogram<u64>>,
    /// Per room index: the lowest and highest seq acked for posts sent in the window.
    windows: HashMap<usize, (u64, u64)>,
    /// Posts acked in the window.
    window_posts: u64,
    /// Error replies by code name.
    errors: HashMap<String, u64>,
    /// Connections closed by the server (GOODBYE or EOF) during the run.
    closed: u64,
    /// Sends skipped because too many posts were in flight.
    skipped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// HELLO and RESUME sent; waiting for AUTHED.
    LoggingIn,
    /// Logged in.
    Ready,
    /// Closed or failed.
    Dead,
}

/// One load connection.
struct LoadConn {
    conn: Connection,
    phase: Phase,
    room: usize,
    /// This connection's sender index, if it posts.
    sender: Option<u32>,
    ledger: SeqLedger,
    /// Posts in flight: request id -> (sent ns, sent inside the window).
    in_flight: HashMap<u32, (u64, bool)>,
    counter: u64,
}

/// The JSON summary.
#[derive(Serialize)]
struct RunSummary {
    server: String,
    tls: bool,
    mode: &'static str,
    connections: usize,
    connections_ready: usize,
    connections_failed: usize,
    rooms: usize,
    senders: usize,
    rate_per_sender: f64,
    duration_secs: u64,
    warmup_secs: u64,
    posts_in_window: u64,
    posts_per_sec: f64,
    deliveries_in_window: u64,
    deliveries_per_sec: f64,
    post_ack: Summary,
    post_to_publish: Summary,
    deliveries: Tally,
    server_closed_connections: u64,
    skipped_sends: u64,
    errors: HashMap<String, u64>,
    rss_before_kib: Option<u64>,
    rss_after_kib: Option<u64>,
    rss_end_kib: Option<u64>,
    rss_per_connection_bytes: Option<f64>,
    setup_secs: f64,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("chime-load: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.connections == 0 || args.rooms == 0 || args.threads == 0 || args.users_per_room == 0 {
        bail!("--connections, --rooms, --threads and --users-per-room must be at least 1");
    }
    if args.rooms > args.connections {
        bail!("--rooms ({}) exceeds --connections ({})", args.rooms, args.connections);
    }
    if args.senders > args.connections {
        bail!("--senders ({}) exceeds --connections ({})", args.senders, args.connections);
    }
    let addr = args
        .server
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.server))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", args.server))?;
    if !addr.ip().is_loopback() && !args.allow_remote {
        bail!("{addr} is not a loopback address; pass --allow-remote to load a remote server");
    }
    let setup_started = Instant::now();
    let prefix = args.user_prefix.clone().unwrap_or_else(|| format!("load{}x", std::process::id() ^ nanos_now()));
    let (rooms, tokens, fingerprint) = setup_users(&args, addr, &prefix)?;
    let tls = if args.tls {
        // Trust on first use, as `chime` does: the certificate the setup clients saw first is
        // pinned for the run (any, if they saw none). Handshake signatures are still verified.
        Some(TlsSetup::tofu(ServerName::from(addr.ip()), fingerprint).context("TLS config")?)
    } else {
        None
    };
    let rss_before = args.daemon_pid.and_then(read_rss_kib);
    let shared = Arc::new(Shared {
        args: args.clone(),
        addr,
        tls,
        rooms: rooms.into_iter().map(|id| RoomState { id, max_acked: AtomicU64::new(0) }).collect(),
        tokens,
        epoch: Instant::now(),
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        start_ns: AtomicU64::new(u64::MAX),
        abort: AtomicBool::new(false),
        posts_in_flight: AtomicU64::new(0),
    });
    let mut handles = Vec::new();
    for t in 0..args.threads {
        let shared = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || event_loop(&shared, t))
                .context("spawning a load thread")?,
        );
    }
    // Setup gets 30 s plus 5 ms per connection (the server paces accepts and logins).
    let setup_deadline = Instant::now() + Duration::from_secs(30) + Duration::from_millis(5 * args.connections as u64);
    loop {
        let done = shared.ready.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire);
        if done >= args.connections {
            break;
        }
        if Instant::now() >= setup_deadline {
            eprintln!("chime-load: setup timed out with {done}/{} connections set up", args.connections);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss_after_connect = args.daemon_pid.and_then(read_rss_kib);
    let setup_secs = setup_started.elapsed().as_secs_f64();
    let ready = shared.ready.load(Ordering::Acquire);
    if !args.json {
        eprintln!(
            "chime-load: {ready}/{} connections logged in after {setup_secs:.1} s; load starts",
            args.connections
        );
    }
    shared.start_ns.store(shared.epoch.elapsed().as_nanos() as u64, Ordering::Release);
    let mut reports = Vec::new();
    for h in handles {
        reports.push(h.join().map_err(|_| anyhow!("a load thread panicked"))?);
    }
    let rss_end = args.daemon_pid.and_then(read_rss_kib);
    report(&args, &shared, reports, [rss_before, rss_after_connect, rss_end], setup_secs)
}

/// Registers the users, creates and joins the rooms. Returns room ids, tokens per room, and the
/// TLS fingerprint seen first.
#[allow(clippy::type_complexity)]
fn setup_users(args: &Args, addr: SocketAddr, prefix: &str) -> Result<(Vec<u64>, Vec<Vec<String>>, Option<[u8; 32]>)> {
    let rooms: Vec<Mutex<Option<u64>>> = (0..args.rooms).map(|_| Mutex::new(None)).collect();
    let tokens: Vec<Mutex<Vec<Option<String>>>> =
        (0..args.rooms).map(|_| Mutex::new(vec![None; args.users_per_room])).collect();
    let fingerprint = Mutex::new(None);
    let next = AtomicUsize::new(0);
    let first_error = Mutex::new(None::<anyhow::Error>);
    let workers = args.rooms.min(8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                // Each worker takes whole rooms so the creator registers before the joiners.
                loop {
                    let r = next.fetch_add(1, Ordering::Relaxed);
                    if r >= args.rooms || lock(&first_error).is_some() {
                        return;
                    }
                    let mut options = ConnectOptions::new(addr.to_string(), args.tls);
                    options.client_name = "chime-load".into();
                    options.timeout = Duration::from_secs(30);
                    options.pinned_fingerprint = *lock(&fingerprint);
                    let result = (|| -> Result<()> {
                        for u in 0..args.users_per_room {
                            let mut client = connect_retrying(&options)?;
                            if lock(&fingerprint).is_none() {
                                *lock(&fingerprint) = client.server_fingerprint();
                            }
                            let name = format!("{prefix}r{r}u{u}");
                            let authed = retry_rate_limited(|| client.register(&name, &args.password, "chime-load"))
                                .with_context(|| format!("registering {name}"))?;
                            let token = authed.token.ok_or_else(|| anyhow!("AUTHED for {name} has no token"))?;
                            if u == 0 {
                                let info = retry_rate_limited(|| client.create_room(&format!("{prefix}room{r}")))
                                    .context("creating a room")?;
                                *lock(&rooms[r]) = Some(info.room.get());
                            } else {
                                let room = lock(&rooms[r]).ok_or_else(|| anyhow!("room {r} was not created"))?;
                                retry_rate_limited(|| client.join_room(room)).context("joining a room")?;
                            }
                            lock(&tokens[r])[u] = Some(token);
                        }
                        Ok(())
                    })();
                    if let Err(e) = result {
                        lock(&first_error).get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let rooms = rooms
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()).ok_or_else(|| anyhow!("a room was not set up")))
        .collect::<Result<Vec<_>>>()?;
    let tokens = tokens
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .into_iter()
                .map(|t| t.ok_or_else(|| anyhow!("a user was not set up")))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let fp = fingerprint.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((rooms, tokens, fp))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn connect_retrying(options: &ConnectOptions) -> Result<Client> {
    let mut delay = Duration::from_millis(50);
    for attempt in 0.. {
        match Client::connect(options) {
            Ok(c) => return Ok(c),
            Err(e) if attempt < 10 => {
                log::debug!("connect failed ({e:?}); retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(anyhow!("connecting to {}: {e:?}", options.addr)),
        }
    }
    unreachable!("the retry loop returns")
}

/// Retries a request the server refused as rate limited or overloaded, with backoff (bounded).
fn retry_rate_limited<T>(mut f: impl FnMut() -> Result<T, ClientError>) -> Result<T> {
    let mut delay = Duration::from_millis(100);
    for _ in 0..60 {
        match f() {
            Err(ClientError::Server(e)) if e.retryable => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other.map_err(|e| anyhow!("{e:?}")),
        }
    }
    bail!("still rate limited after 60 attempts")
}

fn nanos_now() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
}

/// VmRSS of a process in KiB, from /proc.
fn read_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn now_ns(shared: &Shared) -> u64 {
    shared.epoch.elapsed().as_nanos() as u64
}

/// One thread: sets up its share of connections (index % threads == t), runs the load, drains.
fn event_loop(shared: &Shared, t: usize) -> ThreadReport {
    let args = &shared.args;
    let mut report = ThreadReport {
        ack: Some(latency::histogram()),
        publish: Some(latency::histogram()),
        ..ThreadReport::default()
    };
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("chime-load: cannot create a poll: {e}");
            shared.failed.fetch_add(args.connections.div_ceil(args.threads), Ordering::AcqRel);
            return report;
        }
    };
    let mut events = Events::with_capacity(1024);
    let mine: Vec<usize> = (t..args.connections).step_by(args.threads).collect();
    let mut conns: Vec<LoadConn> = Vec::with_capacity(mine.len());
    let mut to_open = mine.iter().copied().peekable();
    let mut logging_in = 0usize;
    // Phase 1: open connections, at most 64 handshakes in flight per thread.
    while shared.start_ns.load(Ordering::Acquire) == u64::MAX && !shared.abort.load(Ordering::Acquire) {
        while logging_in < 64 {
            let Some(i) = to_open.next() else { break };
            let room = i % args.rooms;
            let user = (i / args.rooms) % args.users_per_room;
            match open(shared, &mut poll, conns.len(), room, &shared.tokens[room][user]) {
                Ok(conn) => {
                    let sender = (i < args.senders).then_some(i as u32);
                    conns.push(LoadConn { sender, ..conn });
                    logging_in += 1;
                }
                Err(e) => {
                    log::warn!("connection {i}: {e:#}");
                    shared.failed.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(10))) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                eprintln!("chime-load: poll: {e}");
                break;
            }
        }
        for ev in events.iter() {
            let idx = ev.token().0;
            let before = conns[idx].phase;
            service(shared, &mut poll, &mut conns[idx], idx, &mut report, None);
            let after = conns[idx].phase;
            if before == Phase::LoggingIn && after != Phase::LoggingIn {
                logging_in -= 1;
                if after == Phase::Ready {
                    shared.ready.fetch_add(1, Ordering::AcqRel);
                } else {
                    shared.failed.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }
    // Connections still logging in when main gave up count as failed.
    for c in conns.iter_mut().filter(|c| c.phase == Phase::LoggingIn) {
        c.phase = Phase::Dead;
    }
    let start = shared.start_ns.load(Ordering::Acquire);
    let window_start = start + args.warmup * 1_000_000_000;
    let window_end = window_start + args.duration * 1_000_000_000;
    let window = (window_start, window_end);
    // Phase 2: load (or idle) until the end of the window.
    let interval_ns = if args.rate > 0.0 { (1e9 / args.rate) as u64 } else { 0 };
    let mut schedule: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    if !args.idle {
        for (idx, c) in conns.iter_mut().enumerate() {
            if c.phase == Phase::Ready && c.sender.is_some() {
                if interval_ns > 0 {
                    // Spread the senders' first posts over one interval so they do not fire at once.
                    let offset = (c.sender.unwrap_or(0) as u64).wrapping_mul(2_654_435_761) % interval_ns;
                    schedule.push(Reverse((start + offset, idx)));
                } else {
                    send_post(shared, &mut poll, c, idx, window);
                }
            }
        }
    }
    loop {
        let now = now_ns(shared);
        if now >= window_end || shared.abort.load(Ordering::Acquire) {
            break;
        }
        while let Some(&Reverse((due, idx))) = schedule.peek() {
            if due > now {
                break;
            }
            schedule.pop();
            let c = &mut conns[idx];
            if c.phase != Phase::Ready {
                continue;
            }
            if c.in_flight.len() >= args.max_in_flight {
                report.skipped += 1;
            } else {
                send_post(shared, &mut poll, c, idx, window);
            }
            schedule.push(Reverse((due + interval_ns, idx)));
        }
        let timeout = match schedule.peek() {
            Some(&Reverse((due, _))) => Duration::from_nanos(due.saturating_sub(now_ns(shared)).min(50_000_000)),
            None => Duration::from_nanos((window_end - now).min(50_000_000)),
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                eprintln!("chime-load: poll: {e}");
                break;
            }
        }
        for ev in events.iter() {
            let idx = ev.token().0;
            service(shared, &mut poll, &mut conns[idx], idx, &mut report, Some(window));
            // Closed loop: the next post goes out as soon as the last one is answered.
            let c = &mut conns[idx];
            if !args.idle && interval_ns == 0 && c.sender.is_some() && c.phase == Phase::Ready && c.in_flight.is_empty()
            {
                send_post(shared, &mut poll, c, idx, window);
                if now_ns(shared) >= window_end {
                    break;
                }
            }
        }
    }
    // Phase 3: drain for at most 5 s, until every receiver has what was acked in its room and no
    // post is in flight.
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    while !args.idle && Instant::now() < drain_deadline {
        let caught_up = shared.posts_in_flight.load(Ordering::Acquire) == 0
            && conns.iter().all(|c| {
                c.phase != Phase::Ready
                    || (c.in_flight.is_empty()
                        && c.ledger.last().unwrap_or(0) >= shared.rooms[c.room].max_acked.load(Ordering::Acquire))
            });
        if caught_up {
            break;
        }
        if poll.poll(&mut events, Some(Duration::from_millis(20))).is_err() {
            break;
        }
        for ev in events.iter() {
            let idx = ev.token().0;
            service(shared, &mut poll, &mut conns[idx], idx, &mut report, Some(window));
        }
    }
    report.ledgers = conns
        .into_iter()
        .filter(|c| c.phase != Phase::Dead || c.ledger.last().is_some())
        .map(|c| (c.room, c.ledger))
        .collect();
    report
}

/// Connects, registers with the poll, and sends HELLO + RESUME (pipelined: the RESUME goes out
/// right behind the HELLO, before the WELCOME).
///
/// Nobody calls [`Connection::on_tick`]: the server pings an idle connection and the session
/// answers by itself, and client heartbeats would add traffic to what is being measured.
fn open(shared: &Shared, poll: &mut Poll, idx: usize, room: usize, token: &str) -> Result<LoadConn> {
    let config = SessionConfig::new("chime-load", env!("CARGO_PKG_VERSION"));
    let mut conn = Connection::connect(shared.addr, shared.tls.as_ref(), config, Duration::from_secs(5))?;
    conn.send(&ClientFrame::Resume(Resume { token: token.to_string(), user_agent: "chime-load".into() }))?;
    conn.register(poll.registry(), Token(idx))?;
    conn.flush()?;
    Ok(LoadConn {
        conn,
        phase: Phase::LoggingIn,
        room,
        sender: None,
        ledger: SeqLedger::default(),
        in_flight: HashMap::new(),
        counter: 0,
    })
}

fn send_post(shared: &Shared, poll: &mut Poll, c: &mut LoadConn, idx: usize, window: (u64, u64)) {
    let Some(sender) = c.sender else { return };
    let now = now_ns(shared);
    let text = Stamp { sender, counter: c.counter, sent_ns: now }.encode(shared.args.message_size);
    c.counter += 1;
    let post = Post { room: RoomId(shared.rooms[c.room].id), idempotency_key: format!("{sender}-{}", c.counter), text };
    let id = match c.conn.send(&ClientFrame::Post(post)) {
        Ok(id) => id,
        Err(e) => {
            // The session is closed (the next readiness reports why), or the text does not fit in
            // a frame, a bug in the generator's arguments: either way this sender is done.
            log::error!("connection {idx}: POST not sent: {e}");
            kill(poll, c);
            return;
        }
    };
    c.in_flight.insert(id, (now, now >= window.0 && now < window.1));
    shared.posts_in_flight.fetch_add(1, Ordering::AcqRel);
    if let Err(e) = c.conn.flush() {
        log::debug!("connection {idx}: write failed: {e}");
        kill(poll, c);
    }
}

/// Marks a connection dead and stops polling it.
fn kill(poll: &mut Poll, c: &mut LoadConn) {
    c.phase = Phase::Dead;
    let _ = c.conn.deregister(poll.registry());
}

/// Handles readiness on one connection. `window` is `None` during setup.
fn service(
    shared: &Shared,
    poll: &mut Poll,
    c: &mut LoadConn,
    idx: usize,
    report: &mut ThreadReport,
    window: Option<(u64, u64)>,
) {
    if c.phase == Phase::Dead {
        return;
    }
    // Reads everything there is, answers server pings and writes what waits; an error means the
    // connection is over, but what arrived before it is still in the session's events.
    let outcome = c.conn.ready(Instant::now());
    let now = now_ns(shared);
    while let Some(event) = c.conn.poll_event() {
        match event {
            Event::Reply { frame: ServerFrame::Authed(_), .. } => c.phase = Phase::Ready,
            Event::Reply { request_id, frame: ServerFrame::Posted(p) } => {
                let Some((sent, in_window)) = c.in_flight.remove(&request_id) else { continue };
                shared.rooms[c.room].max_acked.fetch_max(p.seq.get(), Ordering::AcqRel);
                shared.posts_in_flight.fetch_sub(1, Ordering::AcqRel);
                if in_window {
                    if let Some(h) = report.ack.as_mut() {
                        latency::record(h, (now.saturating_sub(sent)) / 1000);
                    }
                    report.window_posts += 1;
                    let w = report.windows.entry(c.room).or_insert((p.seq.get(), p.seq.get()));
                    w.0 = w.0.min(p.seq.get());
                    w.1 = w.1.max(p.seq.get());
                }
            }
            Event::Delta { delta: d, .. } => {
                if d.room != shared.rooms[c.room].id {
                    *report.errors.entry("delta for a foreign room".into()).or_default() += 1;
                    continue;
                }
                c.ledger.observe(d.seq.get());
                if let Some((lo, hi)) = window {
                    if now >= lo && now < hi {
                        report.window_deliveries += 1;
                    }
                    if let Some(stamp) = Stamp::parse(d.text()) {
                        if stamp.sent_ns >= lo && stamp.sent_ns < hi {
                            if let Some(h) = report.publish.as_mut() {
                                latency::record(h, now.saturating_sub(stamp.sent_ns) / 1000);
                            }
                        }
                    }
                }
            }
            Event::Failed { request_id, error: e } => {
                *report.errors.entry(e.code.to_string()).or_default() += 1;
                if c.phase == Phase::LoggingIn && request_id != 0 {
                    log::warn!("connection {idx}: login refused: {e}");
                    c.phase = Phase::Dead;
                }
                let was_post = c.in_flight.remove(&request_id).is_some();
                if was_post {
                    shared.posts_in_flight.fetch_sub(1, Ordering::AcqRel);
                }
                if was_post && e.code == ErrorCode::NOT_MEMBER {
                    c.phase = Phase::Dead;
                }
            }
            Event::Goodbye(g) => {
                *report.errors.entry(format!("goodbye {}", g.code)).or_default() += 1;
                c.phase = Phase::Dead;
            }
            Event::Invalid { error, .. } => {
                let what = match error {
                    SessionError::Decode(e) => format!("undecodable: {e}"),
                    other => format!("invalid: {other}"),
                };
                *report.errors.entry(what).or_default() += 1;
            }
            // The WELCOME, replies nobody waits for (the session answers the server's pings
            // itself), and gaps, which only followed rooms have.
            Event::Connected(_) | Event::Reply { .. } | Event::Push(_) | Event::Gap { .. } => {}
        }
    }
    if let Err(e) = outcome {
        log::debug!("connection {idx}: {e}");
        if c.phase != Phase::Dead {
            report.closed += 1;
        }
        c.phase = Phase::Dead;
    }
    if c.phase == Phase::Dead {
        let _ = c.conn.deregister(poll.registry());
    }
}

fn report(
    args: &Args,
    shared: &Shared,
    reports: Vec<ThreadReport>,
    [rss_before, rss_after, rss_end]: [Option<u64>; 3],
    setup_secs: f64,
) -> Result<()> {
    let mut ack = latency::histogram();
    let mut publish = latency::histogram();
    let mut windows: HashMap<usize, (u64, u64)> = HashMap::new();
    let mut errors: HashMap<String, u64> = HashMap::new();
    let (mut deliveries, mut posts, mut closed, mut skipped) = (0, 0, 0, 0);
    for r in &reports {
        if let Some(h) = &r.ack {
            ack.add(h).map_err(|e| anyhow!("merging histograms: {e}"))?;
        }
        if let Some(h) = &r.publish {
            publish.add(h).map_err(|e| anyhow!("merging histograms: {e}"))?;
        }
        for (&room, &(lo, hi)) in &r.windows {
            let w = windows.entry(room).or_insert((lo, hi));
            w.0 = w.0.min(lo);
            w.1 = w.1.max(hi);
        }
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        deliveries += r.window_deliveries;
        posts += r.window_posts;
        closed += r.closed;
        skipped += r.skipped;
    }
    let mut tally = Tally::default();
    for r in &reports {
        for (room, ledger) in &r.ledgers {
            tally.add(ledger, windows.get(room).copied());
            if std::env::var_os("CHIME_LOAD_DEBUG").is_some() {
                if let Some(&(lo, hi)) = windows.get(room) {
                    if ledger.received_in(lo, hi) < hi - lo + 1 {
                        eprintln!("window {lo}..={hi} ledger {ledger:?}");
                    }
                }
            }
        }
    }
    let ready = shared.ready.load(Ordering::Acquire);
    let rss_per_connection_bytes = match (rss_before, rss_after) {
        (Some(b), Some(a)) if ready > 0 => Some((a as f64 - b as f64) * 1024.0 / ready as f64),
        _ => None,
    };
    let secs = args.duration.max(1) as f64;
    let summary = RunSummary {
        server: shared.addr.to_string(),
        tls: args.tls,
        mode: if args.idle {
            "idle"
        } else if args.rate > 0.0 {
            "rate"
        } else {
            "closed-loop"
        },
        connections: args.connections,
        connections_ready: ready,
        connections_failed: shared.failed.load(Ordering::Acquire),
        rooms: args.rooms,
        senders: if args.idle { 0 } else { args.senders },
        rate_per_sender: args.rate,
        duration_secs: args.duration,
        warmup_secs: args.warmup,
        posts_in_window: posts,
        posts_per_sec: posts as f64 / secs,
        deliveries_in_window: deliveries,
        deliveries_per_sec: deliveries as f64 / secs,
        post_ack: Summary::of(&ack),
        post_to_publish: Summary::of(&publish),
        deliveries: tally,
        server_closed_connections: closed,
        skipped_sends: skipped,
        errors,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_end_kib: rss_end,
        rss_per_connection_bytes,
        setup_secs,
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "chime-load against {} ({}), mode {}",
            summary.server,
            if args.tls { "TLS" } else { "plaintext" },
            summary.mode
        );
        println!(
            "  connections {} ready / {} failed, rooms {}, senders {}, rate {}/s per sender",
            summary.connections_ready,
            summary.connections_failed,
            summary.rooms,
            summary.senders,
            summary.rate_per_sender
        );
        println!("  window {} s after {} s warmup; setup took {:.1} s", args.duration, args.warmup, setup_secs);
        println!("  posts acked      {:>12} ({:.0}/s)", posts, summary.posts_per_sec);
        println!("  deliveries       {:>12} ({:.0}/s)", deliveries, summary.deliveries_per_sec);
        println!("  post ack         {}", summary.post_ack);
        println!("  post to publish  {}", summary.post_to_publish);
        println!(
            "  deliveries expected {} received {} lost {} duplicated {}",
            tally.expected, tally.received, tally.lost, tally.duplicated
        );
        println!("  connections closed by the server: {closed}; sends skipped (too many in flight): {skipped}");
        if !summary.errors.is_empty() {
            println!("  errors: {:?}", summary.errors);
        }
        if let Some(per) = rss_per_connection_bytes {
            println!(
                "  daemon RSS {} KiB before connecting, {} KiB once logged in ({:.0} bytes per connection), {} KiB at the end",
                rss_before.unwrap_or(0),
                rss_after.unwrap_or(0),
                per,
                rss_end.unwrap_or(0)
            );
        }
    }
    Ok(())
}
