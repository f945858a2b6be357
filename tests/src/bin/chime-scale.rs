//! `chime-scale`: the design's scale through the real daemon — one server of a million members
//! and a user in a hundred servers — on either store.
//!
//! It starts `chimed` (the build in `CHIME_BIN_DIR`, e.g. `target/release`, else
//! `target/debug`) on a fresh database, creates the big server through the protocol, writes its
//! members straight into the database (one SQL statement; creating a million accounts through
//! the protocol would cost a million argon2 hashes), makes one user a member of 99 more servers,
//! and then measures through the wire: joining the big server, posting into its `general` channel
//! (acknowledgement, and delivery to the online members), resuming the session of the user in 100
//! servers (subscribing every channel), and the daemon's memory (RSS) throughout. One JSON object
//! on stdout; progress on stderr. Not a test: it takes minutes and reports numbers.

use anyhow::{Context, Result};
use chime_client::blocking::Client;
use chime_protocol::{RoomId, ServerFrame, ServerId};
use chime_tests::daemon::{Backend, Daemon};
use chime_tests::load::latency::{self, Summary};
use chime_tests::seed;
use clap::Parser;
use serde_json::json;
use std::time::{Duration, Instant};

/// Measures a million-member server and a user in a hundred servers.
#[derive(Parser, Debug)]
#[command(name = "chime-scale")]
struct Args {
    /// `sqlite` or `postgres`.
    #[arg(long, default_value = "sqlite")]
    store: String,
    /// Members of the big server.
    #[arg(long, default_value_t = 1_000_000)]
    members: u32,
    /// Servers the busy user is in (the big one included).
    #[arg(long, default_value_t = 100)]
    servers: u32,
    /// Users that join the big server through the protocol (the join timing).
    #[arg(long, default_value_t = 20)]
    joiners: usize,
    /// Posts into the big server's general channel (the post timing).
    #[arg(long, default_value_t = 200)]
    posts: usize,
    /// Session resumptions of the busy user (the login timing).
    #[arg(long, default_value_t = 20)]
    logins: usize,
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

fn main() -> Result<()> {
    let args = Args::parse();
    let backend = match args.store.as_str() {
        "sqlite" => Backend::Sqlite,
        "postgres" => Backend::Postgres,
        other => anyhow::bail!("unknown store {other}: sqlite or postgres"),
    };
    let d = Daemon::start_backend(backend, "scale", &["--login-rate", "1000", "--resume-rate-per-ip", "1000"])
        .context("the store is skipped")?;
    let rss_start = d.rss_kib();
    let mut owner = d.register("owner");
    let big = owner.client.create_server("big", "a million members", true).context("create the big server")?;
    let general = big.channels.first().map(|c| c.room).context("no general channel")?;

    // Seeded so that with the owner, the joiners and the busy user the server holds exactly
    // `members` (its cap is a million: the last joiner fills it).
    let seeded_members = args.members.saturating_sub(u32::try_from(args.joiners).unwrap_or(0) + 2);
    let t = Instant::now();
    seed::server_members(&d.database(), big.server.get(), seeded_members, "m")?;
    let seeded = t.elapsed();
    eprintln!("{seeded_members} members written in {:.1} s", seeded.as_secs_f64());
    let rss_seeded = d.rss_kib();

    // Joining: one row whatever the size, and the channels in the answer.
    let mut join = latency::histogram();
    let mut online: Vec<Client> = Vec::new();
    for _ in 0..args.joiners {
        let mut u = d.register("joiner");
        let t = Instant::now();
        let info = u.client.join_server(big.server)?;
        latency::record(&mut join, t.elapsed().as_micros() as u64);
        anyhow::ensure!(info.members > u64::from(seeded_members), "member count {}", info.members);
        online.push(u.client);
    }
    let join = Summary::of(&join);
    eprintln!("join: p50 {} us, p99 {} us", join.p50_us, join.p99_us);

    // The busy user: in the big server and in servers - 1 others, each with its channel.
    let busy = d.register("busy");
    let mut busy_client = busy.client;
    busy_client.join_server(big.server)?;
    let others = seed::servers(&d.database(), busy.user_id, args.servers.saturating_sub(1))?;
    let mut login = latency::histogram();
    let mut channels = 0;
    for _ in 0..args.logins {
        let t = Instant::now();
        let c = d.resume(&busy.token);
        latency::record(&mut login, t.elapsed().as_micros() as u64);
        drop(c);
    }
    {
        let mut c = d.resume(&busy.token);
        let mut after = ServerId(0);
        loop {
            let page = c.list_servers(after, 0)?;
            channels += page.servers.len();
            match page.next_after {
                Some(n) => after = n,
                None => break,
            }
        }
    }
    let login = Summary::of(&login);
    eprintln!(
        "resume of a user in {channels} servers ({} seeded): p50 {} us, p99 {} us",
        others.len(),
        login.p50_us,
        login.p99_us
    );

    // Posting into the big server's general channel: the ack, and the delivery to every online
    // member (the joiners), which is all the fan-out there is: offline members cost nothing.
    let mut ack = latency::histogram();
    let mut delivered = latency::histogram();
    for i in 0..args.posts {
        let t = Instant::now();
        let posted = owner.client.post(general, &format!("k{i}"), &format!("post {i}"))?;
        latency::record(&mut ack, t.elapsed().as_micros() as u64);
        for c in &mut online {
            loop {
                match c.recv(Some(Duration::from_secs(10)))? {
                    Some((0, ServerFrame::Delta(d))) if d.room == general && d.seq >= posted.seq => break,
                    Some(_) => {}
                    None => anyhow::bail!("a member missed post {i}"),
                }
            }
        }
        latency::record(&mut delivered, t.elapsed().as_micros() as u64);
    }
    let (ack, delivered) = (Summary::of(&ack), Summary::of(&delivered));
    eprintln!(
        "post: ack p50 {} us p99 {} us; all {} online members had it p99 {} us",
        ack.p50_us,
        ack.p99_us,
        online.len(),
        delivered.p99_us
    );
    // The busy user logs in again with the owner's posts unread in `general`: the RESUME and
    // the unread counts of every room it is in (UNREAD, paged), as a client shows them on start.
    let mut login_unread = latency::histogram();
    let mut unread_rooms = 0;
    for _ in 0..args.logins {
        let t = Instant::now();
        let mut c = d.resume(&busy.token);
        let mut after = RoomId(0);
        unread_rooms = 0;
        loop {
            let page = c.unread(after, 0)?;
            unread_rooms += page.rooms.len();
            match page.next_after {
                Some(n) => after = n,
                None => break,
            }
        }
        latency::record(&mut login_unread, t.elapsed().as_micros() as u64);
    }
    anyhow::ensure!(unread_rooms >= 1, "the posts in general are not unread for the busy user");
    let login_unread = Summary::of(&login_unread);
    eprintln!(
        "resume + unread counts of a user in {channels} servers ({unread_rooms} with unread): p50 {} us, p99 {} us",
        login_unread.p50_us, login_unread.p99_us
    );
    let rss_end = d.rss_kib();
    let details = owner.client.get_room(RoomId(general.get()))?;
    let out = json!({
        "store": args.store,
        "members": details.members,
        "seed_s": seeded.as_secs_f64(),
        "join_us": join,
        "post_ack_us": ack,
        "post_delivered_to_online_us": delivered,
        "online_members": online.len(),
        "busy_user_servers": channels,
        "resume_busy_user_us": login,
        "resume_with_unread_us": login_unread,
        "rooms_with_unread": unread_rooms,
        "rss_mib": {"start": mib(rss_start), "after_seeding": mib(rss_seeded), "end": mib(rss_end)},
    });
    println!("{out}");
    Ok(())
}
