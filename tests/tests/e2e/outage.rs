//! The database goes away and comes back, under load, without a daemon restart: PostgreSQL
//! restarted (`pg_ctl restart -m fast`, as an unattended update does) or stopped for a while; the
//! embedded store's disk full, or its file locked by another process. (A file system turned
//! read-only cannot be staged here: Linux refuses to remount read-only while the database is
//! open for writing. Its errors, SQLITE_READONLY and SQLITE_IOERR, take the same path as a full
//! disk's, which the storage tests check.)
//! Meanwhile requests are refused at once with a retryable UNAVAILABLE, chat connections stay
//! up, the log says once that the database is gone and once that it is back, and afterwards
//! everything works again with no acknowledged post lost.

use crate::util::*;
use chime_client::blocking::{Client, ClientError};
use chime_protocol::{ErrorCode, RoomId};
use chime_tests::daemon::{Daemon, DaemonOptions, PASSWORD};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a poster saw: acknowledged posts by seq, and how long each refusal took to arrive.
#[derive(Default)]
struct Seen {
    acked: BTreeMap<u64, String>,
    refusals: Vec<(ErrorCode, Duration)>,
    /// When the first post after the first refusal was acknowledged.
    recovered_at: Option<Instant>,
    first_refusal: Option<Instant>,
}

/// Posts one message after another into `room` until `stop`, retrying each with the same key
/// until it is acknowledged (as `chime send` does).
fn poster(mut client: Client, room: RoomId, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    // Keys unique across posters: a reused key would be answered as a duplicate of an old post.
    let run = unique("run");
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let key = format!("{run}-{n}");
        let text = format!("post {n}");
        loop {
            let sent = Instant::now();
            match client.post(room, &key, &text) {
                Ok(p) => {
                    let mut s = seen.lock().expect("lock");
                    if s.first_refusal.is_some() && s.recovered_at.is_none() {
                        s.recovered_at = Some(Instant::now());
                    }
                    s.acked.insert(p.seq.get(), text.clone());
                    break;
                }
                Err(ClientError::Server(e)) if e.retryable => {
                    let mut s = seen.lock().expect("lock");
                    s.refusals.push((e.code, sent.elapsed()));
                    s.first_refusal.get_or_insert_with(Instant::now);
                    drop(s);
                    std::thread::sleep(Duration::from_millis(50));
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
                Err(e) => panic!("post {n}: {e:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `outage` while a poster posts; returns what it saw once posting works again.
fn under_load(d: &Daemon, room: RoomId, token: &str, outage: impl FnOnce()) -> Seen {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let thread = {
        let (client, stop, seen) = (d.resume(token), stop.clone(), seen.clone());
        std::thread::spawn(move || poster(client, room, stop, seen))
    };
    std::thread::sleep(Duration::from_millis(500));
    outage();
    // Posting works again (or never stopped working).
    let over = Instant::now();
    loop {
        assert!(over.elapsed() < Duration::from_secs(30), "posting did not recover within 30 s\n{}", d.log());
        let s = seen.lock().expect("lock");
        let done = s.recovered_at.is_some() || (s.first_refusal.is_none() && over.elapsed() > Duration::from_secs(2));
        drop(s);
        if done {
            std::thread::sleep(Duration::from_millis(300));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    thread.join().expect("poster");
    Arc::try_unwrap(seen).ok().expect("poster done").into_inner().expect("lock")
}

/// Every acknowledged post is in the room's log, and a member's live connection stayed up and
/// received them all, in order, with no gap.
fn nothing_lost(d: &Daemon, room: RoomId, token: &str, seen: &Seen, member: &mut Client) {
    let mut reader = d.resume(token);
    let log: BTreeMap<u64, String> =
        history_all(&mut reader, room).into_iter().map(|d| (d.seq.get(), d.text().to_string())).collect();
    for (seq, text) in &seen.acked {
        assert_eq!(log.get(seq), Some(text), "acknowledged post at seq {seq} lost");
    }
    let last = *seen.acked.keys().last().expect("some posts");
    let first = *seen.acked.keys().next().expect("some posts");
    let pushes = pushes_until(member, room, last, Duration::from_secs(10));
    let seqs: Vec<u64> = pushes.iter().map(|d| d.seq.get()).filter(|&s| s >= first).collect();
    assert_contiguous("the member's live pushes across the outage", &seqs, first, last);
}

/// Waits (up to 10 s) until the log says the database is back `n` times: the next outage must
/// not start before the last one is over (a second failure within a couple of seconds of the
/// recovery is taken for the same outage).
fn wait_back(d: &Daemon, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log().matches("database reachable again").count() < n {
        assert!(Instant::now() < deadline, "the log never said the database is back:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_logged_once(d: &Daemon, outages: usize) {
    let log = d.log();
    let down = log.matches("database unreachable").count();
    let up = log.matches("database reachable again").count();
    assert_eq!((down, up), (outages, outages), "one line when it goes, one when it is back:\n{log}");
    assert!(!log.contains(" ERROR "), "no ERROR per failed request:\n{log}");
}

fn report(what: &str, seen: &Seen) {
    let slowest = seen.refusals.iter().map(|(_, t)| *t).max().unwrap_or_default();
    let recovery = match (seen.first_refusal, seen.recovered_at) {
        (Some(a), Some(b)) => format!("{:.2} s", b.duration_since(a).as_secs_f64()),
        _ => "no refusal seen".into(),
    };
    eprintln!(
        "{what}: {} posts acknowledged, {} refusals (slowest answer {slowest:?}), first refusal to next ack {recovery}",
        seen.acked.len(),
        seen.refusals.len()
    );
}

#[test]
fn postgres_restarts_and_stops_under_load() {
    if chime_tests::postgres::skip_requested() {
        return;
    }
    // Its own server: this test restarts it.
    let pg = chime_tests::postgres::PgServer::start().expect("a throwaway PostgreSQL");
    let url = pg.create_database("outage");
    let d = Daemon::start(DaemonOptions { database: Some(url), ..DaemonOptions::default() });
    let mut alice = d.register("alice");
    let room = alice.client.create_room("outage").expect("create").room;
    let bob = d.register("bob");
    let mut bob_client = bob.client;
    bob_client.join_room(room).expect("join");

    // 1. A fast restart.
    let restart = under_load(&d, room, &alice.token, || {
        let t = Instant::now();
        pg.restart_fast().expect("pg_ctl restart");
        eprintln!("pg_ctl restart -m fast took {:.2} s", t.elapsed().as_secs_f64());
    });
    report("PostgreSQL restarted", &restart);
    wait_back(&d, 1);
    // 2. Down for three seconds: refusals come at once, not after a timeout.
    let stopped = under_load(&d, room, &alice.token, || {
        pg.stop_fast().expect("pg_ctl stop");
        std::thread::sleep(Duration::from_secs(3));
        pg.start_again().expect("pg_ctl start");
    });
    report("PostgreSQL stopped for 3 s", &stopped);
    wait_back(&d, 2);
    assert!(!stopped.refusals.is_empty(), "posts during a 3 s outage were refused");
    for (code, took) in restart.refusals.iter().chain(&stopped.refusals) {
        assert_eq!(*code, ErrorCode::UNAVAILABLE);
        assert!(*took < Duration::from_secs(2), "a refusal took {took:?}");
    }

    // Everything works again: history, resume, login, join.
    nothing_lost(&d, room, &alice.token, &restart, &mut bob_client);
    nothing_lost(&d, room, &alice.token, &stopped, &mut bob_client);
    let mut fresh = d.client();
    fresh.login(&alice.name, PASSWORD, "after").expect("LOGIN after the outage");
    let mut carol = d.register("carol");
    carol.client.join_room(room).expect("JOIN after the outage");
    bob_client.ping().expect("bob's connection stayed up");
    assert_logged_once(&d, 2);
}

/// Mounts a small tmpfs at `dir` for the embedded store, or says why not (the test needs root
/// or CAP_SYS_ADMIN, as CI has).
fn mount_tmpfs(dir: &std::path::Path, size: &str) -> bool {
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir)
        .status();
    match status {
        Ok(s) if s.success() => true,
        other => {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs at {} ({other:?}); run as root to test disk faults",
                dir.display()
            );
            false
        }
    }
}

/// Unmounts on drop, so a failed test leaves no mount behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn the_embedded_store_survives_a_full_disk_and_a_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    if !mount_tmpfs(&mnt, "16m") {
        return;
    }
    let mounted = Mounted(mnt.clone());
    // The database on the small file system; the daemon's log and key elsewhere.
    let db = mnt.join("chime.db");
    let mut d = Daemon::start(DaemonOptions {
        database: Some(format!("sqlite:{}", db.display())),
        extra_args: vec!["--database-busy-timeout-ms".into(), "500".into()],
        ..DaemonOptions::default()
    });
    let mut alice = d.register("alice");
    let room = alice.client.create_room("disk").expect("create").room;
    let bob = d.register("bob");
    let mut bob_client = bob.client;
    bob_client.join_room(room).expect("join");

    // 1. The disk fills up for 3 s; then space is freed.
    let full = under_load(&d, room, &alice.token, || {
        let filler = mnt.join("filler");
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=64k"])
            .stderr(std::process::Stdio::null())
            .status();
        std::thread::sleep(Duration::from_secs(3));
        std::fs::remove_file(&filler).expect("free the space");
    });
    report("disk full for 3 s", &full);
    assert!(!full.refusals.is_empty(), "writes to a full disk were refused");
    wait_back(&d, 1);

    // 2. Another process holds the database's write lock for 3 s.
    let locked = under_load(&d, room, &alice.token, || {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute_batch("BEGIN EXCLUSIVE").expect("lock");
        std::thread::sleep(Duration::from_secs(3));
        conn.execute_batch("ROLLBACK").expect("unlock");
    });
    report("locked for 3 s", &locked);
    assert!(!locked.refusals.is_empty(), "writes behind another process's lock were refused");
    wait_back(&d, 2);
    for seen in [&full, &locked] {
        for (code, took) in &seen.refusals {
            assert_eq!(*code, ErrorCode::UNAVAILABLE);
            assert!(*took < Duration::from_secs(2), "a refusal took {took:?}");
        }
        nothing_lost(&d, room, &alice.token, seen, &mut bob_client);
    }
    bob_client.ping().expect("bob's connection stayed up");
    assert_logged_once(&d, 2);

    // Nothing corrupt.
    d.stop();
    let conn = rusqlite::Connection::open(&db).expect("open");
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check");
    assert_eq!(check, "ok");
    drop(conn);
    drop(mounted);
}
