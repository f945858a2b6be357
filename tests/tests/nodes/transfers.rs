//! Transfers through real ssh: round trips, a 100 MiB file streamed both ways, ranges and resume,
//! a refused hash, and many transfers multiplexed on one session.

use crate::util::{mb_per_s, node, node_by_url, object_files, object_path, random_file, temp_files};
use chime_tests::sshd::{self, Sshd};
use chimed::node::proto::{ErrorCode, MAX_CHUNK};
use chimed::node::{NodeError, Sha256};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn round_trip_through_ssh_with_both_destination_forms() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd, dir.path(), "n1");
    let n2 = node_by_url(&sshd, dir.path(), "n2");
    let size = 1_000_003;
    let (path, sha) = random_file(dir.path(), "a", size, 1);

    let receipt = n1.link.put(&path, sha, size).expect("put");
    assert_eq!((receipt.sha256, receipt.size, receipt.existed), (sha, size, false));
    // On the node: the object under its hash, whole; nothing left in tmp/.
    assert_eq!(std::fs::read(object_path(&n1.root, &sha)).expect("stored"), std::fs::read(&path).expect("local"));
    assert_eq!(temp_files(&n1.root), 0);

    let mut back = Vec::new();
    assert_eq!(n1.link.get(sha, 0, None, &mut back).expect("get"), size);
    assert_eq!(Sha256::digest(&back), sha);
    assert!(n1.link.has(sha).expect("has"));
    assert_eq!(n1.link.stat(sha).expect("stat"), Some(size));
    // Two roots behind one sshd are two nodes.
    assert!(!n2.link.has(sha).expect("has on n2"));
    assert!(!n2.link.put(&path, sha, size).expect("put to n2 by url").existed);
    assert!(n2.link.has(sha).expect("has on n2"));
    assert!(n1.link.put(&path, sha, size).expect("put again").existed);

    let page = n1.link.list(None, 100).expect("list");
    assert_eq!(page.entries.iter().map(|e| (e.sha256, e.size)).collect::<Vec<_>>(), [(sha, size)]);
    assert!(!page.more);

    let space = n1.link.space().expect("space");
    assert_eq!((space.objects, space.used), (1, size));
    assert!(space.total > 0 && space.free > 0 && space.free <= space.total, "{space:?}");
    if let Some(df_free) = df_available(&n1.root) {
        // Other processes write too: within a GiB of what df says.
        assert!(space.free.abs_diff(df_free) < 1 << 30, "agent says {} free, df says {df_free}", space.free);
    }

    let welcome = n1.link.welcome().expect("welcome");
    assert_eq!(welcome.root, std::fs::canonicalize(&n1.root).expect("root").display().to_string());
    assert!(!welcome.host.is_empty());

    assert!(n1.link.delete(sha).expect("delete"));
    assert!(!n1.link.has(sha).expect("has after delete"));
    assert!(!n1.link.delete(sha).expect("delete again"));
    assert!(matches!(n1.link.get(sha, 0, None, &mut Vec::new()), Err(NodeError::NotFound { .. })));
}

/// Free bytes of the filesystem holding `path`, as df reports them.
fn df_available(path: &std::path::Path) -> Option<u64> {
    let output = std::process::Command::new("df").args(["-B1", "--output=avail"]).arg(path).output().ok()?;
    String::from_utf8_lossy(&output.stdout).lines().nth(1)?.trim().parse().ok()
}

/// A writer that hashes what it gets and remembers the largest single write.
struct Sink {
    hasher: sha2::Sha256,
    bytes: u64,
    writes: u64,
    largest: usize,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use sha2::Digest;
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        self.writes += 1;
        self.largest = self.largest.max(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_hundred_mebibytes_stream_both_ways_in_bounded_memory() {
    const SIZE: u64 = 100 << 20;
    const MEMORY_BOUND_KIB: u64 = 64 << 10;
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd, dir.path(), "big");
    let (path, sha) = random_file(dir.path(), "big-file", SIZE, 100);
    n1.link.connect().expect("connect");

    // Sample this process's memory while the transfers run.
    let me = std::process::id();
    let baseline = sshd::rss_kib(me).expect("rss");
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                peak.fetch_max(sshd::rss_kib(me).unwrap_or(0), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let started = Instant::now();
    let receipt = n1.link.put(&path, sha, SIZE).expect("put 100 MiB");
    let put_time = started.elapsed();
    assert!(!receipt.existed);

    let mut sink = Sink { hasher: sha2::Digest::new(), bytes: 0, writes: 0, largest: 0 };
    let started = Instant::now();
    assert_eq!(n1.link.get(sha, 0, None, &mut sink).expect("get 100 MiB"), SIZE);
    let get_time = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");

    println!(
        "100 MiB through ssh on loopback: put {:.0} MB/s ({put_time:.2?}), get {:.0} MB/s ({get_time:.2?}); \
         link speed estimate {:.0} MB/s",
        mb_per_s(SIZE, put_time),
        mb_per_s(SIZE, get_time),
        n1.link.speed().unwrap_or(0.0) / 1e6
    );
    assert_eq!(Sha256(sha2::Digest::finalize(sink.hasher).into()), sha);
    // Streamed: chunk by chunk, never the whole object at once.
    assert!(sink.largest <= MAX_CHUNK, "a write of {} bytes", sink.largest);
    assert!(sink.writes >= SIZE / MAX_CHUNK as u64, "{} writes", sink.writes);
    let grew = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    println!("test process: resident memory grew by at most {grew} KiB during the transfers");
    assert!(grew < MEMORY_BOUND_KIB, "the daemon side grew by {grew} KiB moving a 100 MiB file");
    // The agent on the node too.
    let agents = sshd::agent_pids(&n1.root);
    assert_eq!(agents.len(), 1, "one agent for the one session: {agents:?}");
    let agent_peak = sshd::peak_rss_kib(agents[0]).expect("agent status");
    println!("agent: peak resident memory {agent_peak} KiB");
    assert!(agent_peak < MEMORY_BOUND_KIB, "the agent peaked at {agent_peak} KiB");
}

/// A writer that fails once it has taken `limit` bytes, like a disk filling up mid-download.
struct BreaksAfter {
    data: Vec<u8>,
    limit: usize,
}

impl Write for BreaksAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.data.len() >= self.limit {
            return Err(io::Error::other("disk full (test)"));
        }
        let n = buf.len().min(self.limit - self.data.len());
        self.data.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn ranges_resume_a_broken_download() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd, dir.path(), "n1");
    let size = 3_000_000u64;
    let (path, sha) = random_file(dir.path(), "f", size, 3);
    let content = std::fs::read(&path).expect("read");
    n1.link.put(&path, sha, size).expect("put");

    let mut part = Vec::new();
    assert_eq!(n1.link.get(sha, 1_000_000, Some(500_000), &mut part).expect("range"), 500_000);
    assert_eq!(part, &content[1_000_000..1_500_000]);
    let mut tail = Vec::new();
    assert_eq!(n1.link.get(sha, 2_500_000, None, &mut tail).expect("tail"), 500_000);
    assert_eq!(tail, &content[2_500_000..]);
    let mut nothing = Vec::new();
    assert_eq!(n1.link.get(sha, size, None, &mut nothing).expect("at the end"), 0);
    assert_eq!(n1.link.get(sha, 0, Some(0), &mut nothing).expect("zero length"), 0);
    let err = n1.link.get(sha, size + 1, Some(1), &mut nothing).expect_err("past the end");
    assert!(matches!(err, NodeError::Refused { code: ErrorCode::RANGE, .. }), "{err}");
    assert!(!err.is_retryable());

    // A download that breaks after about a MiB...
    let mut broken = BreaksAfter { data: Vec::new(), limit: 1_100_000 };
    let err = n1.link.get(sha, 0, None, &mut broken).expect_err("the writer failed");
    assert!(matches!(err, NodeError::Local { .. }), "{err}");
    // ...resumes from the bytes it has, and the whole file checks out.
    let mut rest = Vec::new();
    let have = broken.data.len() as u64;
    assert_eq!(n1.link.get(sha, have, None, &mut rest).expect("resume"), size - have);
    let mut whole = broken.data;
    whole.extend_from_slice(&rest);
    assert_eq!(Sha256::digest(&whole), sha);
    // The cancelled transfer left the session usable.
    assert_eq!(n1.link.stat(sha).expect("stat"), Some(size));
}

#[test]
fn a_hash_mismatch_is_refused_and_leaves_no_object() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd, dir.path(), "n1");
    let size = 700_000u64;
    let (path, sha) = random_file(dir.path(), "f", size, 4);
    let claimed = Sha256::digest(b"not what the file holds");

    let err = n1.link.put(&path, claimed, size).expect_err("mismatch");
    assert!(matches!(err, NodeError::Mismatch { .. }), "{err}");
    assert!(!err.is_retryable(), "the same bytes will not hash differently");
    assert!(err.to_string().contains(&sha.to_hex()), "the node says what the data hashes to: {err}");
    assert_eq!(n1.link.stat(claimed).expect("stat"), None);
    assert!(!object_path(&n1.root, &claimed).exists());
    assert_eq!(object_files(&n1.root), 0);
    assert_eq!(temp_files(&n1.root), 0, "the rejected upload's temp file is gone");

    // The session is fine, and the right hash stores.
    assert!(!n1.link.put(&path, sha, size).expect("put with the right hash").existed);
    assert_eq!(object_files(&n1.root), 1);
}

#[test]
fn many_transfers_share_one_session_and_a_slow_one_holds_up_nobody() {
    const THREADS: u64 = 6;
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd, dir.path(), "n1");
    let (big, big_sha) = random_file(dir.path(), "big-file", 40 * MAX_CHUNK as u64, 50);
    n1.link.put(&big, big_sha, 40 * MAX_CHUNK as u64).expect("put the big one");
    let ssh_pid = n1.link.ssh_pid().expect("a session");

    // A reader that takes 100 ms per chunk: about 4 s for the whole object.
    struct Slow(sha2::Sha256);
    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_millis(100));
            sha2::Digest::update(&mut self.0, buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let slow_done = Arc::new(AtomicBool::new(false));
    let slow = {
        let (link, slow_done) = (n1.link.clone(), slow_done.clone());
        std::thread::spawn(move || {
            let mut out = Slow(sha2::Digest::new());
            let got = link.get(big_sha, 0, None, &mut out);
            slow_done.store(true, Ordering::SeqCst);
            got.map(|n| (n, Sha256(sha2::Digest::finalize(out.0).into())))
        })
    };
    std::thread::sleep(Duration::from_millis(100));

    let started = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let link = n1.link.clone();
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let size = 1_000_000 + i * 333_333;
                let (path, sha) = random_file(&dir, &format!("w{i}"), size, 1000 + i);
                link.put(&path, sha, size).expect("put");
                let mut back = Vec::new();
                assert_eq!(link.get(sha, 0, None, &mut back).expect("get"), size);
                assert_eq!(Sha256::digest(&back), sha);
                assert_eq!(link.stat(sha).expect("stat"), Some(size));
                link.space().expect("space");
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    let fast = started.elapsed();
    assert!(!slow_done.load(Ordering::SeqCst), "the quick transfers ({fast:?}) waited for the slow one");
    let (n, hash) = slow.join().expect("slow thread").expect("slow get");
    assert_eq!((n, hash), (40 * MAX_CHUNK as u64, big_sha));
    assert_eq!(n1.link.ssh_pid(), Some(ssh_pid), "everything went over the one session");
    assert_eq!(sshd::agent_pids(&n1.root).len(), 1);
    println!("{THREADS} threads x (put, get, stat, space) took {fast:?} beside a 4 s download");
}
