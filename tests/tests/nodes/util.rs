//! Shared helpers: links with test timeouts, random files hashed as they are written, a look at
//! a node's directories, bounded waits.

use chime_tests::sshd::Sshd;
use chimed::config::NodeConfig;
use chimed::node::{LinkOptions, NodeLink, Sha256};
use rand::{RngCore, SeedableRng};
use sha2::Digest;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Timeouts short enough for tests, long enough for a loaded CI machine.
pub fn options() -> LinkOptions {
    LinkOptions {
        connect_timeout: Duration::from_secs(15),
        reply_timeout: Duration::from_secs(15),
        slot_timeout: Duration::from_secs(30),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        ..LinkOptions::default()
    }
}

/// A node under test: its link, its config and its root directory on the (loopback) node.
pub struct TestNode {
    pub link: NodeLink,
    pub config: NodeConfig,
    pub root: PathBuf,
}

/// A node named `name` with its store in `dir/name`, reached through the sshd's Host alias.
pub fn node(sshd: &Sshd, dir: &Path, name: &str) -> TestNode {
    let root = dir.join(name);
    let config = sshd.node(name, &root);
    TestNode { link: NodeLink::new(&config, options()), config, root }
}

/// Like [`node`], reached as `ssh://user@127.0.0.1:PORT`.
pub fn node_by_url(sshd: &Sshd, dir: &Path, name: &str) -> TestNode {
    let root = dir.join(name);
    let config = sshd.node_by_url(name, &root);
    TestNode { link: NodeLink::new(&config, options()), config, root }
}

/// A file of `size` pseudo-random bytes (from `seed`) and its hash, written in 1 MiB pieces so
/// no test holds a big file in memory.
pub fn random_file(dir: &Path, name: &str, size: u64, seed: u64) -> (PathBuf, Sha256) {
    let path = dir.join(name);
    let mut file = BufWriter::new(File::create(&path).expect("create"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    file.flush().expect("flush");
    (path, Sha256(hasher.finalize().into()))
}

/// Where the agent keeps object `sha256` under `root`.
pub fn object_path(root: &Path, sha256: &Sha256) -> PathBuf {
    let hex = sha256.to_hex();
    root.join("objects").join(&hex[..2]).join(&hex[2..])
}

/// Files in the node's `tmp/` (uploads in progress or abandoned).
pub fn temp_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("tmp")).map(|entries| entries.count()).unwrap_or(0)
}

/// Object files under the node's `objects/`.
pub fn object_files(root: &Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(root.join("objects")) else { return 0 };
    dirs.flatten().map(|d| std::fs::read_dir(d.path()).map(|files| files.count()).unwrap_or(0)).sum()
}

/// Polls `check` every 5 ms until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// MB/s (10^6 bytes per second).
pub fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}
