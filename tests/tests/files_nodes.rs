//! Files on storage nodes through the real daemon: a `chimed` started by the harness with a small
//! `[files] cache_quota` and `[[node]]` entries reaching a throwaway sshd on loopback (two node
//! directories), the real `chime` CLI uploading and downloading. Eviction to the nodes and the
//! download back through ssh; a node killed mid-download (failover), every node down (a
//! retryable UNAVAILABLE, then a resume from the `.part` once they are back); the daemon killed
//! by the crash hook in the middle of an eviction, then restarted. Needs `cargo build
//! --workspace --bins` first; `CHIME_SKIP_SSH=1` skips.
//!
//! The measurement (`measure_100_mib_download_from_a_node`, ignored by default) is run on the
//! release build: see docs/performance.md, "Files: cache and nodes".

#[path = "nodes/util.rs"]
#[allow(dead_code)]
mod util;

use chime_tests::daemon::{Daemon, DaemonOptions};
use chime_tests::sshd::{self, Sshd};
use chimed::content;
use chimed::node::Sha256;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use util::{object_files, object_path, random_file, temp_files, wait_for};

const MIB: u64 = 1 << 20;

/// How long one CLI command may take (a 96 MiB upload on a loaded debug build included).
const CLI_TIMEOUT: Duration = Duration::from_secs(90);

/// One test's world: the sshd, the node roots, the daemon's data dir and config, the CLI's home.
struct Setup {
    sshd: Sshd,
    dir: tempfile::TempDir,
    config: PathBuf,
    home: PathBuf,
}

impl Setup {
    /// An sshd and a config with `[files]` as given and one `[[node]]` per `(name, priority)`,
    /// each with its root in the temp dir; `None` when sshd tests are skipped.
    fn new(quota: u64, max_size: u64, copies: u32, nodes: &[(&str, i32)]) -> Option<Setup> {
        let sshd = Sshd::start_or_skip()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        // The admin commands find the cache through the config's data_dir, the daemon through
        // --data-dir: the same directory.
        let mut text = format!(
            "data_dir = {:?}\n[files]\nmax_size = {max_size}\ncache_quota = {quota}\ncopies = {copies}\n",
            data.display().to_string()
        );
        for &(name, priority) in nodes {
            let node = sshd.node(name, &dir.path().join(name));
            text.push_str(&format!(
                "\n[[node]]\nname = {name:?}\nssh = {:?}\nssh_options = {:?}\nroot = {:?}\nagent = {:?}\npriority = {priority}\n",
                node.ssh, node.ssh_options, node.root, node.agent
            ));
        }
        let config = dir.path().join("chimed.toml");
        fs::write(&config, text).expect("config");
        let home = dir.path().join("home");
        Some(Setup { sshd, dir, config, home })
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn cache(&self) -> PathBuf {
        self.data().join("cache")
    }

    fn root(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    fn options(&self) -> DaemonOptions {
        DaemonOptions { data_dir: Some(self.data()), ..DaemonOptions::default() }
            .with_args(["--config".to_string(), self.config.display().to_string()])
    }

    /// Placements recorded in the daemon's index, all nodes together.
    fn placements(&self) -> u64 {
        content::index::counts_at(&self.cache().join("index.sqlite")).expect("index").iter().map(|c| c.1).sum()
    }

    /// Content objects in the daemon's cache.
    fn cached(&self) -> usize {
        object_files(&self.cache())
    }

    /// Whether the cache holds `sha` (its objects are named by the whole hex, unlike a node's).
    fn is_cached(&self, sha: &Sha256) -> bool {
        let hex = sha.to_hex();
        self.cache().join("objects").join(&hex[..2]).join(&hex).is_file()
    }

    /// `chimed admin ARGS --json --config CONFIG`, one JSON object per line.
    fn admin(&self, args: &[&str]) -> Vec<Value> {
        let mut cmd = Command::new(chime_tests::daemon::binary("chimed"));
        cmd.arg("admin").args(args).args(["--json", "--config"]).arg(&self.config);
        let (code, stdout, stderr) = run(&mut cmd);
        assert_eq!(code, Some(0), "chimed admin {args:?}: {stdout}{stderr}");
        json_lines(&stdout)
    }
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// Runs a command to its end within [`CLI_TIMEOUT`]: exit code, stdout, stderr.
fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut child = cmd
        .stdout(fs::File::create(&out).expect("stdout file"))
        .stderr(fs::File::create(&err).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let status = wait_child(&mut child, CLI_TIMEOUT).unwrap_or_else(|| panic!("{cmd:?} did not finish in time"));
    (status.code(), fs::read_to_string(&out).unwrap_or_default(), fs::read_to_string(&err).unwrap_or_default())
}

/// Waits for a child within `timeout`; kills and reaps it when time is up (and returns `None`).
fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The CLI, logged in, with a room to upload into.
struct User {
    home: PathBuf,
    room: String,
}

fn user(d: &Daemon, s: &Setup) -> User {
    let name = format!("nodes{}", std::process::id());
    cli_ok(d, &s.home, &["register", &name]);
    let created = cli_ok(d, &s.home, &["room", "create", "files"]);
    let room = created[0]["room"].as_u64().expect("room id").to_string();
    User { home: s.home.clone(), room }
}

fn cli_ok(d: &Daemon, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = d.cli(home);
    cmd.args(args);
    let (code, stdout, stderr) = run(&mut cmd);
    assert_eq!(code, Some(0), "chime {args:?}: stderr: {stderr}\nstdout: {stdout}");
    json_lines(&stdout)
}

/// Uploads `size` random bytes (from `seed`) with `chime upload`: the file id and the hash.
fn upload(d: &Daemon, u: &User, dir: &Path, name: &str, size: u64, seed: u64) -> (u64, Sha256) {
    let (path, sha) = random_file(dir, name, size, seed);
    let up = cli_ok(d, &u.home, &["upload", &u.room, path.to_str().expect("utf-8")]);
    assert_eq!(up[0]["sha256"].as_str(), Some(sha.to_hex().as_str()), "{up:?}");
    fs::remove_file(&path).expect("remove the source");
    (up[0]["file"].as_u64().expect("file id"), sha)
}

/// `chime download FILE -o OUT` as a child process (stdout and stderr into files beside OUT).
fn spawn_download(d: &Daemon, u: &User, file: u64, out: &Path) -> Child {
    let mut cmd = d.cli(&u.home);
    cmd.args(["download", &file.to_string(), "-o", out.to_str().expect("utf-8")])
        .stdout(fs::File::create(out.with_extension("stdout")).expect("stdout file"))
        .stderr(fs::File::create(out.with_extension("stderr")).expect("stderr file"));
    cmd.spawn().expect("spawn chime download")
}

/// `chime download FILE -o OUT` to its end: exit code, stderr.
fn download(d: &Daemon, u: &User, file: u64, out: &Path) -> (Option<i32>, String) {
    let mut child = spawn_download(d, u, file, out);
    let status = wait_child(&mut child, CLI_TIMEOUT).expect("chime download did not finish in time");
    (status.code(), fs::read_to_string(out.with_extension("stderr")).unwrap_or_default())
}

/// Downloads with `chime download` and checks the bytes' hash.
fn download_ok(d: &Daemon, u: &User, file: u64, sha: &Sha256, out: &Path) {
    let (code, stderr) = download(d, u, file, out);
    assert_eq!(code, Some(0), "chime download {file}: {stderr}");
    assert_eq!(hash_file(out), *sha, "the downloaded bytes of file {file}");
    fs::remove_file(out).expect("remove the copy");
}

fn hash_file(path: &Path) -> Sha256 {
    Sha256::of_reader(fs::File::open(path).expect("open")).expect("read").0
}

/// The size of the daemon's fetch of `sha` from a node (its temp file in `cache/fetch/`), if one
/// is under way.
fn fetch_progress(s: &Setup, sha: &Sha256) -> Option<u64> {
    let prefix = sha.to_hex();
    fs::read_dir(s.cache().join("fetch"))
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
}

/// Polls every millisecond (a fetch over loopback ssh is quick) until `check` holds.
fn wait_fast(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn files_over_quota_go_to_both_nodes_and_download_back_through_ssh() {
    let Some(s) = Setup::new(4 * MIB, 4 * MIB, 2, &[("n1", 0), ("n2", 0)]) else { return };
    let d = Daemon::start(s.options());
    let u = user(&d, &s);
    // Three 1.5 MiB files in a 4 MiB cache: the third puts it over, the first (least recently
    // used) leaves for the nodes.
    let files: Vec<(u64, Sha256)> =
        (0..3).map(|i| upload(&d, &u, s.dir.path(), &format!("f{i}.bin"), 3 * MIB / 2, 100 + i)).collect();
    let (first, first_sha) = files[0];
    wait_for("the first file evicted", Duration::from_secs(60), || !s.is_cached(&first_sha));
    for node in ["n1", "n2"] {
        assert!(object_path(&s.root(node), &first_sha).is_file(), "{node} holds a copy");
    }
    // Only once both copies were recorded did the local one go.
    let listed = s.admin(&["nodes"]);
    for node in ["n1", "n2"] {
        let line = listed.iter().find(|l| l["node"] == node).unwrap_or_else(|| panic!("{node} in {listed:?}"));
        assert_eq!(line["reachable"], true, "{line}");
        assert!(line["files"].as_u64() >= Some(1), "{line}");
    }
    wait_for("each copy recorded once", Duration::from_secs(30), || {
        s.placements() == (object_files(&s.root("n1")) + object_files(&s.root("n2"))) as u64
    });

    // Back through ssh: the daemon fetches it from a node while the client follows.
    download_ok(&d, &u, first, &first_sha, &s.dir.path().join("back.bin"));
    // And every other file, wherever it is now.
    for &(file, sha) in &files[1..] {
        download_ok(&d, &u, file, &sha, &s.dir.path().join(format!("back{file}.bin")));
    }
    // The cache keeps to its quota after the reads brought content back.
    wait_for("the cache under quota again", Duration::from_secs(60), || {
        files.iter().filter(|(_, sha)| s.is_cached(sha)).count() <= 2
    });
    // Once the puts the reads caused are done: no temp files, each copy recorded once.
    wait_for("the nodes settled", Duration::from_secs(60), || {
        temp_files(&s.root("n1")) + temp_files(&s.root("n2")) == 0
            && s.placements() == (object_files(&s.root("n1")) + object_files(&s.root("n2"))) as u64
    });
}

#[test]
fn a_node_killed_mid_download_fails_over_and_no_node_left_is_unavailable_until_they_return() {
    // Both hold a copy; n1 is preferred.
    let Some(mut s) = Setup::new(100 * MIB, 96 * MIB, 2, &[("n1", 1), ("n2", 0)]) else { return };
    let d = Daemon::start(s.options());
    let u = user(&d, &s);
    let size = 96 * MIB;
    let (big, sha) = upload(&d, &u, s.dir.path(), "big.bin", size, 7);
    // A second file puts the cache over quota; the big one is the older.
    upload(&d, &u, s.dir.path(), "small.bin", 8 * MIB, 8);
    wait_for("the big file evicted", Duration::from_secs(90), || !s.is_cached(&sha));
    for node in ["n1", "n2"] {
        assert!(object_path(&s.root(node), &sha).is_file(), "{node} holds a copy");
    }

    // Killed mid-way: the node serving the daemon's fetch dies once the fetch has some bytes.
    let out = s.dir.path().join("big.out");
    let mut child = spawn_download(&d, &u, big, &out);
    // (Or already done, on a machine quicker than the polling: then there is nothing to cut.)
    wait_fast("the fetch under way", Duration::from_secs(30), || {
        fetch_progress(&s, &sha).is_some_and(|n| n >= 4 * MIB) || s.is_cached(&sha)
    });
    // Every agent frozen first, so that what was sent is known before one dies (a kill alone
    // could land just after the last byte), and the one serving the read is found by the object
    // it has open (priority prefers n1, but the choice is the daemon's).
    let agents: Vec<(&str, Vec<u32>)> = ["n1", "n2"].into_iter().map(|n| (n, sshd::agent_pids(&s.root(n)))).collect();
    for (_, pids) in &agents {
        pids.iter().for_each(|&pid| sshd::signal(pid, libc::SIGSTOP));
    }
    std::thread::sleep(Duration::from_millis(100));
    let at_kill = if s.is_cached(&sha) { size } else { fetch_progress(&s, &sha).unwrap_or(size) };
    let serving =
        agents.iter().find(|(n, pids)| pids.iter().any(|&pid| sshd::has_open(pid, &object_path(&s.root(n), &sha))));
    let victim = serving.map_or("n1", |(n, _)| *n);
    for (node, pids) in &agents {
        let sig = if *node == victim { libc::SIGKILL } else { libc::SIGCONT };
        pids.iter().for_each(|&pid| sshd::signal(pid, sig));
    }
    let status = wait_child(&mut child, CLI_TIMEOUT).expect("the download ends");
    let stderr = fs::read_to_string(out.with_extension("stderr")).unwrap_or_default();
    assert!(status.success(), "the download fails over to the other node: {stderr}");
    assert_eq!(hash_file(&out), sha);
    fs::remove_file(&out).expect("remove");
    if at_kill < size {
        assert!(serving.is_some(), "an agent was reading the object at {at_kill} of {size} bytes");
        let failover = format!("fetch from node {victim} failed, trying the next copy");
        assert!(d.log().contains(&failover), "failover logged: {failover}");
    } else {
        eprintln!("note: the fetch had finished ({at_kill} bytes) before a node could be killed");
    }
    println!("{victim} killed with {at_kill} of {size} bytes fetched; the download completed from the other node");

    // Another upload puts the cache over quota again and the big file, read before it, goes
    // out again (an unlink: it has its placements). It may be out already: a read that began
    // after an eviction fetches it anew, and then it fits.
    upload(&d, &u, s.dir.path(), "push.bin", 8 * MIB, 9);
    wait_for("the big file evicted again", Duration::from_secs(90), || !s.is_cached(&sha));

    // Every node down mid-download: the agents are frozen as soon as the fetch has bytes (so the
    // client holds a part), then sshd and everything under it is killed.
    let out = s.dir.path().join("again.out");
    let mut child = spawn_download(&d, &u, big, &out);
    // At least a few chunks: a download's read waits for whole 256 KiB chunks.
    wait_fast("the fetch under way", Duration::from_secs(30), || {
        fetch_progress(&s, &sha).is_some_and(|n| n >= 4 * MIB) || s.is_cached(&sha)
    });
    assert!(!s.is_cached(&sha), "the fetch finished before the nodes could be stopped");
    for node in ["n1", "n2"] {
        for pid in sshd::agent_pids(&s.root(node)) {
            sshd::signal(pid, libc::SIGSTOP);
        }
    }
    let part = PathBuf::from(format!("{}.part", out.display()));
    // What was fetched before the freeze reaches the client.
    std::thread::sleep(Duration::from_millis(500));
    s.sshd.stop();
    let status = wait_child(&mut child, CLI_TIMEOUT).expect("the download ends");
    let stderr = fs::read_to_string(out.with_extension("stderr")).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "no node: the download fails: {stderr}");
    assert!(stderr.to_lowercase().contains("unavailable"), "the error says the file is unavailable for now: {stderr}");
    let held = fs::metadata(&part).map_or(0, |m| m.len());
    println!("every node down: chime download exited 1 with {held} bytes in the part: {}", stderr.trim());
    assert!(held > 0 && held < size, "the part is partial: {held} bytes");

    // The nodes return: a retry continues from the part and completes. The daemon's link waits
    // out its backoff after the failures, so the retry is repeated a bounded number of times.
    s.sshd.restart().expect("sshd restarts on its port");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tries = 0;
    loop {
        tries += 1;
        let (code, stderr) = download(&d, &u, big, &out);
        if code == Some(0) {
            break;
        }
        assert!(stderr.to_lowercase().contains("unavailable"), "only unavailable while the link backs off: {stderr}");
        assert!(Instant::now() < deadline, "no successful retry within 60 s ({tries} tries): {stderr}");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(hash_file(&out), sha, "the resumed download");
    assert!(!part.exists());
    println!("retried {tries} time(s) after the nodes came back; resumed from byte {held}");
}

/// The daemon aborted by the crash hook at `point` while it evicts, restarted without the hook:
/// every file downloads with its hash, each node copy is recorded exactly once, and the eviction
/// completes.
fn crash_mid_eviction(point: &str) {
    let Some(s) = Setup::new(4 * MIB, 4 * MIB, 1, &[("n1", 0)]) else { return };
    let mut d = Daemon::start(s.options().with_env(content::CRASH_ENV, point));
    let u = user(&d, &s);
    let files: Vec<(u64, Sha256)> =
        (0..3).map(|i| upload(&d, &u, s.dir.path(), &format!("c{i}.bin"), 3 * MIB / 2, 200 + i)).collect();
    // The third upload put the cache over quota: the content thread evicts, and aborts.
    wait_for("the daemon to abort", Duration::from_secs(60), || !d.is_running());
    assert!(d.log().contains(&format!("{}: aborting at", content::CRASH_ENV)), "the hook fired:\n{}", d.log());
    assert_eq!(s.cached(), 3, "nothing deleted locally");
    assert_eq!(object_files(&s.root("n1")), 1, "the node has the verified copy");
    let expected = if point == "after_put" { 0 } else { 1 };
    assert_eq!(s.placements(), expected, "placements recorded before the abort at {point}");

    d.remove_env(content::CRASH_ENV);
    d.restart();
    // Eviction completes after the restart: under quota, each node copy recorded once.
    wait_for("the eviction to finish", Duration::from_secs(60), || {
        s.cached() <= 2 && s.placements() >= 1 && s.placements() == object_files(&s.root("n1")) as u64
    });
    assert!(!s.is_cached(&files[0].1), "the oldest left the cache");
    for (i, &(file, sha)) in files.iter().enumerate() {
        download_ok(&d, &u, file, &sha, &s.dir.path().join(format!("back{i}.bin")));
    }
    // The reads brought content back over quota; once that eviction is done too, nothing is
    // counted twice and no temp file is left on the node.
    wait_for("placements == node objects, no temp files", Duration::from_secs(60), || {
        s.cached() <= 2 && s.placements() == object_files(&s.root("n1")) as u64 && temp_files(&s.root("n1")) == 0
    });
    let listed = s.admin(&["nodes"]);
    assert_eq!(listed[0]["files"].as_u64(), Some(s.placements()), "{listed:?}");
}

#[test]
fn a_daemon_killed_after_a_put_before_its_record_loses_nothing() {
    crash_mid_eviction("after_put");
}

#[test]
fn a_daemon_killed_after_the_record_before_the_local_delete_counts_nothing_twice() {
    crash_mid_eviction("after_record");
}

/// The figure of docs/performance.md: 100 MiB evicted to a node, then downloaded with the
/// release `chime` through the release daemon, which fetches it through ssh; the daemon's peak
/// RSS during it. Run with `CHIME_BIN_DIR=target/release` (see the doc).
#[test]
#[ignore = "a measurement: run on the release build, see docs/performance.md"]
fn measure_100_mib_download_from_a_node() {
    let size = 100 * MIB;
    let Some(s) = Setup::new(100 * MIB, 100 * MIB, 1, &[("n1", 0)]) else { return };
    let d = Daemon::start(s.options());
    let u = user(&d, &s);
    let (big, sha) = upload(&d, &u, s.dir.path(), "big.bin", size, 42);
    upload(&d, &u, s.dir.path(), "push.bin", MIB, 43);
    let started = Instant::now();
    wait_for("evicted", Duration::from_secs(120), || !s.is_cached(&sha));
    let evicted_in = started.elapsed();
    let pid = d.pid().expect("pid");
    let hwm_before = sshd::peak_rss_kib(pid).unwrap_or(0);
    let rss_before = sshd::rss_kib(pid).unwrap_or(0);
    // VmHWM holds the upload's peak already: the download's own peak is sampled.
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak.fetch_max(sshd::rss_kib(pid).unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let out = s.dir.path().join("big.out");
    let started = Instant::now();
    let (code, stderr) = download(&d, &u, big, &out);
    let took = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().expect("sampler");
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(hash_file(&out), sha);
    let hwm = sshd::peak_rss_kib(pid).unwrap_or(0);
    println!(
        "100 MiB from node n1 through ssh via chimed to `chime download` on loopback: {:.2}s ({:.0} MB/s); \
         evicted in {:.2}s; chimed VmRSS {} MiB before, peak {} MiB during; VmHWM {} MiB before (the upload's), {} MiB after",
        took.as_secs_f64(),
        util::mb_per_s(size, took),
        evicted_in.as_secs_f64(),
        rss_before / 1024,
        peak / 1024,
        hwm_before / 1024,
        hwm / 1024
    );
}
