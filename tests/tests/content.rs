//! The content store over real storage nodes: `chimed::content::Content` moving content to
//! `chimed node` agents through a real `ssh` to a throwaway `sshd` on loopback, reading it back,
//! failing over when a node dies mid-read, and `chimed admin rebalance` killed (kill -9 style,
//! through the crash hook) between a node's put and the placement record, and between the record
//! and the local delete. Needs `cargo build -p chimed` first; `CHIME_SKIP_SSH=1` skips.

#[path = "nodes/util.rs"]
#[allow(dead_code)]
mod util;

use chime_tests::sshd::{self, Sshd};
use chimed::content::{self, Content, ContentError};
use chimed::node::{NodeLink, Nodes, Sha256};
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use util::{object_path, options, random_file, wait_for};

const MIB: u64 = 1 << 20;

/// Writes `size` random bytes as an upload and admits them.
fn upload(content: &Content, name: &str, size: u64, seed: u64) -> Sha256 {
    let uploads = content.dir().join("uploads");
    let (path, sha) = random_file(&uploads, &format!("{name}.part"), size, seed);
    let _guard = content.lock(sha);
    content.admit(&path, sha, size).expect("admit");
    sha
}

/// Reads the whole content and returns its hash.
fn read_hash(content: &Content, sha: Sha256) -> Sha256 {
    let reader = content.reader(sha, 0).expect("reader");
    Sha256::of_reader(reader).expect("read").0
}

fn links(sshd: &Sshd, dir: &Path, names: &[(&str, i32)]) -> Vec<NodeLink> {
    names
        .iter()
        .map(|&(name, priority)| {
            let mut config = sshd.node(name, &dir.join(name));
            config.priority = priority;
            NodeLink::new(&config, options())
        })
        .collect()
}

#[test]
fn eviction_over_quota_keeps_copies_on_both_nodes_reads_back_and_forget_removes_everywhere() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = Arc::new(Nodes::new(links(&sshd, dir.path(), &[("n1", 0), ("n2", 0)]), 2));
    let content = Content::open(&dir.path().join("cache"), 20 * MIB, nodes).expect("open");
    let shas: Vec<Sha256> = (0..3).map(|i| upload(&content, &format!("u{i}"), 8 * MIB, i)).collect();
    wait_for("the cache under its quota", Duration::from_secs(60), || content.cached_bytes() <= 20 * MIB);
    // The least recently used (the first) left the cache, onto both nodes, verified there.
    assert!(!content.is_cached(shas[0]));
    assert!(content.is_cached(shas[2]));
    for node in ["n1", "n2"] {
        assert!(object_path(&dir.path().join(node), &shas[0]).is_file(), "{node} has a copy");
    }
    let mut placed = content.placements(shas[0]).expect("placements");
    placed.sort();
    assert_eq!(placed, ["n1", "n2"]);
    // Read back through ssh, hash checked; it is cached again.
    assert_eq!(read_hash(&content, shas[0]), shas[0]);
    wait_for("cached again", Duration::from_secs(30), || content.is_cached(shas[0]));
    // Forget removes it from the cache and both nodes.
    {
        let _guard = content.lock(shas[0]);
        content.forget(shas[0]).expect("forget");
    }
    assert!(!content.has(shas[0]) && !content.is_cached(shas[0]));
    for node in ["n1", "n2"] {
        assert!(!object_path(&dir.path().join(node), &shas[0]).exists(), "{node} still has it");
    }
    assert!(matches!(content.reader(shas[0], 0), Err(ContentError::NotFound(_))));
}

#[test]
fn a_node_killed_mid_read_fails_over_to_the_other_copy_and_no_node_is_a_retryable_error() {
    let Some(mut sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    // n1 is preferred, so it serves the read that we then cut.
    let nodes = Arc::new(Nodes::new(links(&sshd, dir.path(), &[("n1", 1), ("n2", 0)]), 2));
    let content = Content::open(&dir.path().join("cache"), 16 * MIB, nodes).expect("open");
    let a = upload(&content, "a", 32 * MIB, 1);
    let b = upload(&content, "b", 32 * MIB, 2);
    wait_for("both evicted", Duration::from_secs(90), || !content.is_cached(a) && !content.is_cached(b));

    let mut reader = content.reader(a, 0).expect("reader");
    let mut first = vec![0u8; MIB as usize];
    reader.read_exact(&mut first).expect("first MiB");
    // Every agent frozen first, then the one serving the read (found by the object it has open:
    // reads go to the fastest reachable holder, not always n1) is killed and the other thawed.
    let agents: Vec<(&str, Vec<u32>)> =
        ["n1", "n2"].into_iter().map(|n| (n, sshd::agent_pids(&dir.path().join(n)))).collect();
    for (_, pids) in &agents {
        pids.iter().for_each(|&pid| sshd::signal(pid, libc::SIGSTOP));
    }
    std::thread::sleep(Duration::from_millis(100));
    let serving = agents
        .iter()
        .find(|(n, pids)| pids.iter().any(|&pid| sshd::has_open(pid, &object_path(&dir.path().join(n), &a))));
    let victim = serving.map_or("n1", |(n, _)| *n);
    for (node, pids) in &agents {
        let sig = if *node == victim { libc::SIGKILL } else { libc::SIGCONT };
        pids.iter().for_each(|&pid| sshd::signal(pid, sig));
    }
    if serving.is_none() {
        eprintln!("note: no agent had the object open (the fetch had finished): failover not exercised");
    }
    let mut hasher_input = first;
    reader.read_to_end(&mut hasher_input).expect("the rest, from n2");
    assert_eq!(hasher_input.len() as u64, 32 * MIB);
    assert_eq!(Sha256::digest(&hasher_input), a);
    drop(hasher_input);

    // Every node gone: a clear, retryable error. The store is reopened on fresh links after the
    // stop: a session its background thread was opening while sshd died could otherwise
    // outlive the stop (the harness kills sshd's children, then the listener).
    drop(reader);
    drop(content);
    sshd.stop();
    wait_for("the agents gone", Duration::from_secs(10), || {
        ["n1", "n2"].iter().all(|n| sshd::agent_pids(&dir.path().join(n)).is_empty())
    });
    let nodes = Arc::new(Nodes::new(links(&sshd, dir.path(), &[("n1", 1), ("n2", 0)]), 2));
    // A fetch thread finishing (syncing the re-cached file) may still hold the old store's lock.
    let mut reopened = None;
    wait_for("the cache free to reopen", Duration::from_secs(20), || {
        reopened = Content::open(&dir.path().join("cache"), 16 * MIB, nodes.clone()).ok();
        reopened.is_some()
    });
    let content = reopened.expect("reopened");
    let started = Instant::now();
    let err = match content.reader(b, 0) {
        Ok(_) => panic!("a node served {b} after every node was stopped"),
        Err(e) => e,
    };
    assert!(err.is_retryable(), "{err}");
    assert!(matches!(err, ContentError::Unavailable(..)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}

/// The objects under a node root.
fn objects(root: &Path) -> usize {
    util::object_files(root)
}

/// Content files in the cache.
fn cached(cache: &Path) -> usize {
    util::object_files(cache)
}

#[test]
fn a_rebalance_killed_between_put_record_and_delete_loses_nothing_and_counts_nothing_twice() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let cache = data.join("cache");
    let root = dir.path().join("n1");
    // Three 512 KiB files in a 1 MiB cache: two must go to n1.
    let shas: Vec<Sha256> = {
        let content = Content::open(&cache, 100 * MIB, Arc::new(Nodes::new(vec![], 1))).expect("open");
        (0..3).map(|i| upload(&content, &format!("f{i}"), 512 << 10, 10 + i)).collect()
    };
    let node = sshd.node("n1", &root);
    let config = format!(
        "data_dir = {data:?}\n[files]\nmax_size = {MIB}\ncache_quota = {MIB}\n\n[[node]]\nname = \"n1\"\nssh = {:?}\n\
         ssh_options = {:?}\nroot = {:?}\nagent = {:?}\n",
        node.ssh,
        node.ssh_options,
        node.root,
        node.agent,
        data = data.display().to_string(),
    );
    let config_path = dir.path().join("chimed.toml");
    std::fs::write(&config_path, config).expect("config");
    let rebalance = |crash: Option<&str>| {
        let mut command = Command::new(chime_tests::daemon::binary("chimed"));
        command.args(["admin", "rebalance", "--json", "--timeout", "60", "--config"]).arg(&config_path);
        if let Some(point) = crash {
            command.env(content::CRASH_ENV, point);
        }
        command.output().expect("run chimed admin rebalance")
    };
    let index = cache.join("index.sqlite");
    let placed = || -> u64 { content::index::counts_at(&index).expect("index").iter().map(|c| c.1).sum() };

    // Killed after the node stored a copy, before the placement was recorded.
    let out = rebalance(Some("after_put"));
    assert!(!out.status.success(), "it was to crash: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(cached(&cache), 3, "nothing deleted locally");
    assert_eq!(objects(&root), 1, "the node has the verified copy");
    assert_eq!(placed(), 0, "but it is not counted");

    // Killed after the placement was recorded, before the local delete.
    let out = rebalance(Some("after_record"));
    assert!(!out.status.success(), "it was to crash: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(cached(&cache), 3, "nothing deleted locally");
    assert_eq!(objects(&root), 1, "the same copy, not a second one");
    assert_eq!(placed(), 1);

    // A clean run finishes the job.
    let out = rebalance(None);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    // Under quota now: at least two on the node (the crashed runs were rebalances too, so the
    // files not read since count as cold and may all have gone).
    assert!(cached(&cache) <= 1, "{} cached", cached(&cache));
    assert!(objects(&root) >= 2);
    assert_eq!(placed(), objects(&root) as u64, "each copy counted once");
    assert_eq!(util::temp_files(&root), 0, "no half-written copy left behind");
    // Nothing lost: every file reads back with its hash.
    let nodes = Arc::new(Nodes::new(vec![NodeLink::new(&node, options())], 1));
    let content = Content::open(&cache, 100 * MIB, nodes).expect("reopen");
    for sha in shas {
        assert_eq!(read_hash(&content, sha), sha);
    }
}

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    sshd::rss_kib(std::process::id()).unwrap_or(0)
}

#[test]
fn a_100_mib_file_reads_back_from_a_node_through_ssh() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = Arc::new(Nodes::new(links(&sshd, dir.path(), &[("n1", 0)]), 1));
    let content = Content::open(&dir.path().join("cache"), 50 * MIB, nodes).expect("open");
    let size = 100 * MIB;
    let sha = upload(&content, "big", size, 99);
    let started = Instant::now();
    wait_for("evicted", Duration::from_secs(120), || !content.is_cached(sha));
    let evicted_in = started.elapsed();

    let before = rss_kib();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let started = Instant::now();
    let got = read_hash(&content, sha);
    let read_in = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().expect("sampler");
    assert_eq!(got, sha);
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "100 MiB: evicted to the node in {:.2}s; read back through ssh in {:.2}s ({:.0} MB/s); process RSS {} MiB before, peak {} MiB during (+{} MiB)",
        evicted_in.as_secs_f64(),
        read_in.as_secs_f64(),
        util::mb_per_s(size, read_in),
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024
    );
}

#[test]
fn admin_rebalance_reaches_the_running_daemon_and_admin_nodes_counts_the_files() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let root = dir.path().join("n1");
    // Two files already in the daemon's cache, well under its quota.
    let shas: Vec<Sha256> = {
        let content = Content::open(&data.join("cache"), 100 * MIB, Arc::new(Nodes::new(vec![], 1))).expect("open");
        (0..2).map(|i| upload(&content, &format!("f{i}"), MIB, 20 + i)).collect()
    };
    let node = sshd.node("n1", &root);
    let config_path = dir.path().join("chimed.toml");
    let config = format!(
        "data_dir = {:?}\n[files]\ncache_quota = {}\n\n[[node]]\nname = \"n1\"\nssh = {:?}\nssh_options = {:?}\n\
         root = {:?}\nagent = {:?}\n",
        data.display().to_string(),
        100 * MIB,
        node.ssh,
        node.ssh_options,
        node.root,
        node.agent,
    );
    std::fs::write(&config_path, config).expect("config");
    let daemon = chime_tests::daemon::Daemon::start(
        chime_tests::daemon::DaemonOptions { data_dir: Some(data.clone()), ..Default::default() }
            .with_args(["--config".to_string(), config_path.display().to_string()]),
    );
    let admin = |args: &[&str]| {
        let out = Command::new(chime_tests::daemon::binary("chimed"))
            .arg("admin")
            .args(args)
            .args(["--json", "--config"])
            .arg(&config_path)
            .output()
            .expect("run chimed admin");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str::<serde_json::Value>(stdout.trim()).expect("one JSON object")
    };
    // The first rebalance marks the time; the second moves out what was not read since.
    let first = admin(&["rebalance"]);
    assert_eq!(first["moved_out"], 0, "{first}");
    let second = admin(&["rebalance"]);
    assert_eq!(second["moved_out"], 2, "{second}");
    for sha in &shas {
        assert!(object_path(&root, sha).is_file());
    }
    // It was the daemon that did it (it holds the cache), not the admin command.
    assert!(daemon.log().contains("content: rebalance done"), "{}", daemon.log());
    let nodes = admin(&["nodes"]);
    assert_eq!((nodes["node"].as_str(), nodes["files"].as_u64()), (Some("n1"), Some(2)), "{nodes}");
}

/// Unmounts a tmpfs on drop, so a failed test leaves no mount behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A node whose disk runs short (someone else filled it) is drained by a rebalance: its biggest
/// objects move to the other node, each verified there and recorded before the short node's copy
/// is deleted, and everything still reads back. The short node is a 16 MiB tmpfs (needs root or
/// CAP_SYS_ADMIN, as CI has; skipped otherwise).
#[test]
fn a_node_short_of_space_is_drained_to_the_other_by_a_rebalance() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = dir.path().join("n1disk");
    std::fs::create_dir_all(&mount).expect("mount point");
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(&mount).status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot mount a tmpfs at {} (needs root)", mount.display());
        return;
    }
    let _unmount = Mounted(mount.clone());
    let (root1, root2) = (mount.join("root"), dir.path().join("n2"));
    let mut n1 = sshd.node("n1", &root1);
    n1.priority = 1;
    let n2 = sshd.node("n2", &root2);
    let nodes = Arc::new(Nodes::new(vec![NodeLink::new(&n1, options()), NodeLink::new(&n2, options())], 1));
    let content = Content::open(&dir.path().join("cache"), 4 * MIB, nodes).expect("open");
    let shas: Vec<Sha256> = (0..3).map(|i| upload(&content, &format!("s{i}"), 3 * MIB, 40 + i)).collect();
    // Over quota: the oldest go to n1, the preferred node.
    wait_for("eviction to n1", Duration::from_secs(60), || content.cached_bytes() <= 4 * MIB && objects(&root1) >= 2);
    let on_n1 = objects(&root1);
    assert_eq!(objects(&root2), 0, "n1 is preferred while it has room");

    // Something else fills n1's disk to the last byte.
    {
        use std::io::Write;
        let mut junk = std::fs::File::create(mount.join("junk")).expect("junk");
        let block = vec![0u8; 256 << 10];
        for _ in 0..256 {
            if junk.write_all(&block).and_then(|()| junk.sync_data()).is_err() {
                break;
            }
        }
    }
    let report = content.rebalance();
    assert!(report.moved_between_nodes >= 1, "{report:?}");
    assert_eq!(objects(&root1), on_n1 - report.moved_between_nodes as usize, "{report:?}");
    assert_eq!(objects(&root2) as u64, report.moved_between_nodes, "{report:?}");
    assert_eq!(util::temp_files(&root1) + util::temp_files(&root2), 0);
    for sha in &shas {
        let placed = content.placements(*sha).expect("placements");
        assert!(placed.len() <= 1, "{sha}: one copy, recorded once: {placed:?}");
        for node in placed {
            let root = if node == "n1" { &root1 } else { &root2 };
            assert!(object_path(root, sha).exists(), "{sha} recorded on {node} and there");
        }
        assert_eq!(read_hash(&content, *sha), *sha);
    }
    drop(content);
}
