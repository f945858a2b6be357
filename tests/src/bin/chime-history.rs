//! `chime-history`: history at scale, measured through a real `chimed`.
//!
//! It starts a `chimed` (the one next to this binary unless `--chimed` says otherwise) on a fresh
//! store of the kind asked for (a data dir of its own for SQLite; a throwaway PostgreSQL server
//! for PostgreSQL), registers a user and creates a room over the wire, then fills the room with
//! `--deltas` messages straight through the store API (`append_posts`, `--batch` posts per group
//! commit: the same code path as the daemon's, without the network in the way). Optionally
//! `--filler` more deltas go into 100 other rooms by plain SQL, to grow the log table around the
//! room measured. Then, through the daemon:
//!
//! - RESTORE of the whole room page by page at `--page` deltas, oldest first and newest first,
//!   under the daemon's default rate limit and again with it lifted (a second daemon on the same
//!   store): total time, pages, each page's round trip (p50/p99/max), and the waits the limit
//!   imposed. Every delta is checked to arrive once and in order.
//! - SEARCH: `--searches` queries (one or two words, from common to absent), each the first page
//!   of 50 results: round trips p50/p99 overall and per kind of query.
//!
//! On PostgreSQL the tables are vacuumed and analyzed after the fill, as autovacuum would do
//! within a minute or two, so that it does not run in the middle of the measurements.
//!
//! The messages are words drawn from a fixed vocabulary with a Zipf-like skew (the commonest word
//! is in about one message in seven), from a seeded generator, so runs are comparable.

use anyhow::{bail, Context, Result};
use chime_client::blocking::{Client, ClientError, ConnectOptions};
use chime_protocol::{ErrorCode, RestoreOrder, RoomId, Seq};
use chime_storage::{NewPost, OpenOptions, RoomKind, UserId};
use chime_tests::load::latency::{self, Summary};
use chime_tests::postgres::PgServer;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// History at scale: RESTORE and SEARCH over a large room, through a real chimed.
#[derive(Parser, Debug)]
#[command(name = "chime-history", version)]
struct Args {
    /// Which store.
    #[arg(long, value_enum)]
    store: Store,
    /// Messages in the room measured (after its CREATE).
    #[arg(long, default_value_t = 1_000_000)]
    deltas: u64,
    /// Posts per group commit while filling it.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Deltas in 100 other rooms, written by plain SQL (not indexed), to grow the log around the
    /// room measured.
    #[arg(long, default_value_t = 0)]
    filler: u64,
    /// Deltas asked for per RESTORE page.
    #[arg(long, default_value_t = 1000)]
    page: u32,
    /// Searches measured.
    #[arg(long, default_value_t = 500)]
    searches: usize,
    /// The chimed binary [default: the one next to this program].
    #[arg(long)]
    chimed: Option<PathBuf>,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// With `--store postgres`: this (empty) database instead of a throwaway server's.
    #[arg(long)]
    database: Option<String>,
    /// Keep the data dir and chimed's log here instead of a temporary directory removed at exit.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Store {
    Sqlite,
    Postgres,
}

/// Words of the vocabulary; word `i` has weight 1 / (i + 1).
const VOCABULARY: usize = 5_000;
/// Words per message, at least and at most.
const WORDS: (usize, usize) = (6, 14);
/// Results per search, as `chime search` asks by default.
const SEARCH_PAGE: u32 = 50;

#[derive(Debug, Serialize)]
struct Report {
    store: Store,
    deltas: u64,
    filler: u64,
    fill_secs: f64,
    fill_deltas_per_sec: f64,
    restore: Vec<RestoreRun>,
    search: SearchRun,
}

#[derive(Debug, Serialize)]
struct RestoreRun {
    order: &'static str,
    rate_limit: String,
    deltas: u64,
    pages: u64,
    total_secs: f64,
    waits: u64,
    page: Summary,
}

#[derive(Debug, Serialize)]
struct SearchRun {
    all: Summary,
    by_kind: Vec<(String, Summary, f64)>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.batch == 0 || args.page == 0 {
        bail!("--batch and --page must be at least 1");
    }
    let chimed = match &args.chimed {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("chimed"),
    };
    if !chimed.is_file() {
        bail!("{} not found: build it (cargo build --release -p chimed) or pass --chimed", chimed.display());
    }
    let temp = tempfile::Builder::new().prefix("chime-history-").tempdir()?;
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let pg = match (args.store, &args.database) {
        (Store::Postgres, None) => Some(PgServer::start()?),
        _ => None,
    };
    let url = match (&pg, &args.database) {
        (Some(server), _) => server.create_database("history"),
        (None, Some(url)) if args.store == Store::Postgres => url.clone(),
        _ => format!("sqlite:{}", work.join("data/chime.db").display()),
    };

    let daemon = Daemon::start(&chimed, &work, &url, &[])?;
    let user = format!("bench{}", std::process::id());
    let mut client = daemon.client()?;
    let authed = client.register(&user, "correct horse battery", "chime-history")?;
    let token = authed.token.context("REGISTER gave no token")?;
    let room = client.create_room("history")?.room;

    let started = Instant::now();
    fill(&url, room, authed.user_id, &user, args.deltas, args.batch)?;
    if args.filler > 0 {
        filler(&url, authed.user_id, args.filler)?;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    if args.store == Store::Postgres {
        // What autovacuum does to tables that grew this much, before measuring rather than
        // during it: statistics (without them the planner cannot tell a common word from a rare
        // one) and a vacuum (hint bits and the visibility map, which the first reads of freshly
        // loaded rows would otherwise write).
        postgres::Client::connect(&url, postgres::NoTls)?.batch_execute("VACUUM ANALYZE")?;
    }
    let head = args.deltas + 1;
    if !args.json {
        eprintln!("filled room {room} with {} deltas (+{} filler) in {fill_secs:.1} s", args.deltas, args.filler);
    }

    let mut restore = Vec::new();
    for order in [RestoreOrder::OLDEST_FIRST, RestoreOrder::NEWEST_FIRST] {
        // A full bucket for each run, as for a device that starts restoring: the default burst
        // of 400 pages refills at 200 a second.
        std::thread::sleep(Duration::from_millis(2_500));
        let mut c = daemon.resume(&token)?;
        restore.push(restore_room(&mut c, room, order, args.page, head, "default (200/s, burst 400)")?);
    }
    drop(client);
    drop(daemon);
    // The same store under a daemon with the limit lifted: what the server itself takes.
    let daemon =
        Daemon::start(&chimed, &work, &url, &["--restore-pages-per-sec", "1000000", "--restore-burst", "1000000"])?;
    for order in [RestoreOrder::OLDEST_FIRST, RestoreOrder::NEWEST_FIRST] {
        let mut c = daemon.resume(&token)?;
        restore.push(restore_room(&mut c, room, order, args.page, head, "lifted")?);
    }
    let mut c = daemon.resume(&token)?;
    let search = search_room(&mut c, room, args.searches)?;
    drop(daemon);

    let report = Report {
        store: args.store,
        deltas: args.deltas,
        filler: args.filler,
        fill_secs,
        fill_deltas_per_sec: (args.deltas + args.filler) as f64 / fill_secs,
        restore,
        search,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
}

/// The words of the vocabulary: pronounceable, distinct, deterministic.
fn vocabulary() -> Vec<String> {
    const SYLLABLES: [&str; 24] = [
        "ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "po", "da", "fe", "gu", "ha", "ji", "ko", "la", "me",
        "no", "pi", "qua", "re", "si", "tu",
    ];
    (0..VOCABULARY)
        .map(|i| {
            let (a, b, c) = (i % 24, (i / 24) % 24, i / 576);
            format!("{}{}{}", SYLLABLES[a], SYLLABLES[b], SYLLABLES[c % 24])
        })
        .collect()
}

/// Draws word indexes with weight 1 / (rank + 1), by inverting the cumulative weights.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Zipf {
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|i| {
                total += 1.0 / (i as f64 + 1.0);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    fn draw(&self, rng: &mut StdRng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let x = rng.random::<f64>() * total;
        self.cumulative.partition_point(|&c| c < x).min(self.cumulative.len() - 1)
    }
}

/// Appends `count` messages to `room` through the store API, `batch` per group commit.
fn fill(url: &str, room: RoomId, author: UserId, name: &str, count: u64, batch: usize) -> Result<()> {
    let mut store = chime_storage::open_with(url, &OpenOptions::default())?;
    let words = vocabulary();
    let zipf = Zipf::new(words.len());
    let mut rng = StdRng::seed_from_u64(7);
    let mut written = 0u64;
    let now = chime_storage::now_ms();
    while written < count {
        let n = usize::try_from((count - written).min(batch as u64))?;
        let posts: Vec<NewPost> = (0..n)
            .map(|_| {
                let len = rng.random_range(WORDS.0..=WORDS.1);
                let text: Vec<&str> = (0..len).map(|_| words[zipf.draw(&mut rng)].as_str()).collect();
                NewPost {
                    room,
                    author_id: author,
                    author: name.to_string(),
                    idempotency_key: String::new(),
                    text: text.join(" "),
                    now_ms: now,
                }
            })
            .collect();
        store.append_posts(&posts)?;
        written += n as u64;
    }
    Ok(())
}

/// Writes `count` deltas into 100 new rooms with plain SQL, around the store (no partitions,
/// no index): bulk to make the log table big.
fn filler(url: &str, owner: UserId, count: u64) -> Result<()> {
    let mut store = chime_storage::open(url)?;
    let per_room = count.div_ceil(100);
    let mut rooms = Vec::new();
    for i in 0..100 {
        let (r, _) = store.create_room(&format!("filler{i}"), RoomKind::GROUP, owner, "filler", 0, u64::MAX)?;
        rooms.push(r.id.get());
    }
    drop(store);
    for room in rooms {
        // Seq 1 is the CREATE; the filler follows it.
        let last = per_room + 1;
        let sql = |series: &str| {
            format!(
                "INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at)
                 SELECT {room}, g, 2, {owner}, 'filler message number ' || g, g FROM {series};
                 UPDATE rooms SET last_seq = {last} WHERE id = {room};"
            )
        };
        match url.strip_prefix("sqlite:") {
            Some(path) => {
                let c = rusqlite::Connection::open(path)?;
                c.execute_batch(&sql(&format!(
                    "(WITH RECURSIVE s(g) AS (SELECT 2 UNION ALL SELECT g + 1 FROM s WHERE g < {last}) SELECT g FROM s)"
                )))?;
            }
            None => {
                let mut c = postgres::Client::connect(url, postgres::NoTls)?;
                c.batch_execute(&sql(&format!("generate_series(2, {last}) AS g")))?;
            }
        }
    }
    Ok(())
}

/// Restores the whole room page by page, timing each round trip; checks every seq arrives once
/// and in order.
fn restore_room(
    client: &mut Client,
    room: RoomId,
    order: RestoreOrder,
    page: u32,
    head: u64,
    limit: &str,
) -> Result<RestoreRun> {
    let newest_first = order == RestoreOrder::NEWEST_FIRST;
    let mut hist: Histogram<u64> = latency::histogram();
    let (mut cursor, mut deltas, mut pages, mut waits) = (Seq::ZERO, 0u64, 0u64, 0u64);
    let mut expect = if newest_first { head } else { 1 };
    let started = Instant::now();
    loop {
        let asked = Instant::now();
        let reply = match client.restore(room, order, cursor, page) {
            Ok(reply) => reply,
            Err(ClientError::Server(e)) if e.code == ErrorCode::RATE_LIMITED => {
                waits += 1;
                std::thread::sleep(Duration::from_millis(e.retry_after_ms().unwrap_or(10)));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        latency::record(&mut hist, u64::try_from(asked.elapsed().as_micros())?);
        pages += 1;
        for d in &reply.deltas {
            if d.seq.get() != expect {
                bail!("restore gave seq {} where {expect} was due", d.seq);
            }
            expect = if newest_first { expect - 1 } else { expect + 1 };
            deltas += 1;
        }
        match reply.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    if deltas != head {
        bail!("restore gave {deltas} deltas of {head}");
    }
    Ok(RestoreRun {
        order: if newest_first { "newest first" } else { "oldest first" },
        rate_limit: limit.to_string(),
        deltas,
        pages,
        total_secs: started.elapsed().as_secs_f64(),
        waits,
        page: Summary::of(&hist),
    })
}

/// What a measured search looks for. Ranks 0-9 are each in 4-15% of messages, ranks 100-999 in
/// about 0.1%, ranks 4,000 and up in about one message in 5,000, and an absent word in none.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Common,
    Mid,
    Rare,
    CommonAndMid,
    Absent,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::Common, Kind::Mid, Kind::Rare, Kind::CommonAndMid, Kind::Absent];

    fn name(self) -> &'static str {
        match self {
            Kind::Common => "common word",
            Kind::Mid => "mid word",
            Kind::Rare => "rare word",
            Kind::CommonAndMid => "common + mid",
            Kind::Absent => "absent word",
        }
    }

    fn query(self, words: &[String], rng: &mut StdRng) -> String {
        match self {
            Kind::Common => words[rng.random_range(0..10)].clone(),
            Kind::Mid => words[rng.random_range(100..1000)].clone(),
            Kind::Rare => words[rng.random_range(4000..VOCABULARY)].clone(),
            Kind::CommonAndMid => format!("{} {}", words[rng.random_range(0..10)], words[rng.random_range(100..1000)]),
            Kind::Absent => format!("zz{}", rng.random_range(0..1_000_000)),
        }
    }
}

/// Runs `count` searches, the kinds in turn, after a few unmeasured ones.
fn search_room(client: &mut Client, room: RoomId, count: usize) -> Result<SearchRun> {
    let words = vocabulary();
    let mut rng = StdRng::seed_from_u64(11);
    for kind in Kind::ALL.iter().cycle().take(10) {
        client.search(room, &kind.query(&words, &mut rng), Seq::ZERO, SEARCH_PAGE)?;
    }
    let mut all = latency::histogram();
    let mut by_kind: Vec<(Histogram<u64>, u64)> = Kind::ALL.iter().map(|_| (latency::histogram(), 0)).collect();
    for i in 0..count {
        let k = i % Kind::ALL.len();
        let query = Kind::ALL[k].query(&words, &mut rng);
        let asked = Instant::now();
        let page = client.search(room, &query, Seq::ZERO, SEARCH_PAGE)?;
        let us = u64::try_from(asked.elapsed().as_micros())?;
        latency::record(&mut all, us);
        latency::record(&mut by_kind[k].0, us);
        by_kind[k].1 += page.messages.len() as u64;
    }
    Ok(SearchRun {
        all: Summary::of(&all),
        by_kind: Kind::ALL
            .iter()
            .zip(&by_kind)
            .map(|(kind, (hist, hits))| {
                let s = Summary::of(hist);
                (kind.name().to_string(), s, *hits as f64 / s.count.max(1) as f64)
            })
            .collect(),
    })
}

fn print_human(r: &Report) {
    println!(
        "{:?}: {} deltas in the room (+{} filler), filled in {:.1} s ({:.0} deltas/s)",
        r.store, r.deltas, r.filler, r.fill_secs, r.fill_deltas_per_sec
    );
    for run in &r.restore {
        println!(
            "RESTORE {} [{}]: {} deltas in {} pages, {:.2} s, {} rate-limit waits; per page {}",
            run.order, run.rate_limit, run.deltas, run.pages, run.total_secs, run.waits, run.page
        );
    }
    println!("SEARCH (first page of {SEARCH_PAGE}): {}", r.search.all);
    for (kind, s, hits) in &r.search.by_kind {
        println!("  {kind:<13} {s}  (mean {hits:.1} results)");
    }
}

/// A chimed of this run, stopped when dropped.
struct Daemon {
    child: Child,
    addr: SocketAddr,
}

impl Daemon {
    fn start(chimed: &Path, work: &Path, url: &str, extra: &[&str]) -> Result<Daemon> {
        let port = |l: TcpListener| l.local_addr().map(|a| a.port());
        let plain = port(TcpListener::bind("127.0.0.1:0")?)?;
        let tls = port(TcpListener::bind("127.0.0.1:0")?)?;
        let log = std::fs::File::create(work.join("chimed.log"))?;
        let child = Command::new(chimed)
            .args(["serve", "--listen", &format!("127.0.0.1:{tls}")])
            .args(["--plaintext-listen", &format!("127.0.0.1:{plain}")])
            .arg("--data-dir")
            .arg(work.join("data"))
            .args(["--database", url])
            .args(extra)
            .env("RUST_LOG", std::env::var("CHIMED_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", chimed.display()))?;
        let daemon = Daemon { child, addr: SocketAddr::from(([127, 0, 0, 1], plain)) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if daemon.client().is_ok() {
                return Ok(daemon);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("chimed did not start; see {}", work.join("chimed.log").display())
    }

    fn client(&self) -> Result<Client, ClientError> {
        let mut options = ConnectOptions::new(self.addr.to_string(), false);
        options.timeout = Duration::from_secs(30);
        Client::connect(&options)
    }

    fn resume(&self, token: &str) -> Result<Client> {
        let mut c = self.client()?;
        c.resume(token, "chime-history")?;
        Ok(c)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM and wait: the next daemon opens the same store.
        let pid = self.child.id();
        // The pid is our own child's, alive until waited for.
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let _ = self.child.wait();
    }
}
