//! The content store over in-process agents (no ssh): eviction over quota, reading back,
//! copies, forget, the scan at open, and reconciliation.

use super::*;
use crate::node::link::Transport;
use crate::node::store::Store;
use crate::node::{LinkOptions, NodeLink};
use std::io::Write;

fn link(name: &str, root: &Path) -> NodeLink {
    crate::node::link::testing::local_link(name, root, std::sync::Arc::default())
}

/// Stages `data` as upload `name` and admits it.
fn upload(content: &Content, name: &str, data: &[u8]) -> Sha256 {
    let path = content.staging_path(name);
    File::create(&path).and_then(|mut f| f.write_all(data)).expect("stage");
    let sha = Sha256::digest(data);
    let _guard = content.lock(sha);
    content.admit(&path, sha, data.len() as u64).expect("admit");
    sha
}

fn read_all(content: &Content, sha: Sha256) -> Vec<u8> {
    let mut out = Vec::new();
    content.reader(sha, 0).expect("reader").read_to_end(&mut out).expect("read");
    out
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn over_quota_content_moves_to_nodes_and_reads_back_into_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = Arc::new(Nodes::new(vec![link("a", &dir.path().join("a")), link("b", &dir.path().join("b"))], 2));
    let content = Content::open(&dir.path().join("cache"), 3 << 20, nodes).expect("open");
    let first = data(2 << 20, 1);
    let a = upload(&content, "u1", &first);
    let b = upload(&content, "u2", &data(2 << 20, 2));
    // 4 MiB in a 3 MiB cache: the least recently used goes, onto both nodes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while content.is_cached(a) {
        assert!(std::time::Instant::now() < deadline, "not evicted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(content.is_cached(b));
    let mut placed = content.placements(a).expect("placements");
    placed.sort();
    assert_eq!(placed, ["a", "b"]);
    assert!(content.has(a));
    // Read back through a node; afterwards it is cached again (and b goes out).
    assert_eq!(read_all(&content, a), first);
    // Readers are done before the fetched file is synced and moved in.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !content.is_cached(a) {
        assert!(std::time::Instant::now() < deadline, "not cached again");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut tail = Vec::new();
    content.reader(a, 10).expect("range").read_to_end(&mut tail).expect("read");
    assert_eq!(tail, first[10..]);

    // Forget removes it everywhere.
    {
        let _guard = content.lock(a);
        content.forget(a).expect("forget");
    }
    assert!(!content.has(a));
    assert!(content.placements(a).expect("placements").is_empty());
    assert!(matches!(content.reader(a, 0), Err(ContentError::NotFound(_))));
    for node in content.nodes().links() {
        assert_eq!(node.stat(a).expect("stat"), None);
    }
}

#[test]
fn a_restart_rebuilds_the_order_and_rechecks_placements() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("a");
    let cache = dir.path().join("cache");
    let nodes = Arc::new(Nodes::new(vec![link("a", &root)], 1));
    let (x, y);
    {
        let content = Content::open(&cache, 100 << 20, nodes.clone()).expect("open");
        // A second open of the same directory is refused while the first holds it.
        let again = Content::open(&cache, 100 << 20, nodes.clone()).err().map(|e| e.kind());
        assert_eq!(again, Some(io::ErrorKind::WouldBlock));
        x = upload(&content, "x", b"xxxx");
        y = upload(&content, "y", b"yyyy");
        // A rebalance with nothing cold moves nothing; one after it moves what was not read.
        content.rebalance();
        let _ = read_all(&content, y);
        let report = content.rebalance();
        assert_eq!(report.moved_out, 1, "{report:?}");
        assert!(!content.is_cached(x) && content.is_cached(y));
    }
    // The node loses x behind our back; an object appears there that nobody recorded.
    let lost = Store::open(&root).expect("store");
    lost.delete(&x).expect("delete");
    let stray_data = b"stray";
    let stray = Sha256::digest(stray_data);
    let mut put = lost.begin_put(stray, 5).expect("put");
    put.write(stray_data).expect("write");
    put.finish().expect("finish");
    drop(lost);

    let content = Content::open(&cache, 100 << 20, nodes).expect("reopen");
    assert!(content.is_cached(y) && !content.is_cached(x));
    // The background thread reconciles at start too; whichever runs first, afterwards the lost
    // copy's record is gone and the stray object is recorded.
    content.rebalance();
    assert!(!content.has(x));
    assert!(content.has(stray));
    assert_eq!(read_all(&content, stray), stray_data);
}

#[test]
fn no_reachable_node_is_a_retryable_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let connector = || -> io::Result<Transport> { Err(io::Error::other("no ssh here")) };
    let down = NodeLink::with_connector("down", 0, LinkOptions::default(), Box::new(connector));
    let content = Content::open(&dir.path().join("cache"), 1 << 20, Arc::new(Nodes::new(vec![down], 1))).expect("open");
    let sha = Sha256::digest(b"somewhere");
    lock(&content.inner.index).add_placement(sha, "down", 9).expect("record");
    let err = content.reader(sha, 0).err().expect("unavailable");
    assert!(err.is_retryable(), "{err}");
}

#[test]
fn a_rebalance_request_file_reaches_the_store_that_holds_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = Arc::new(Nodes::new(vec![link("a", &dir.path().join("a"))], 1));
    let cache = dir.path().join("cache");
    let content = Content::open(&cache, 100 << 20, nodes).expect("open");
    let x = upload(&content, "x", b"cold");
    content.rebalance();
    // Not read since that rebalance: the one asked for through the file moves it out.
    let report = background::request_rebalance(&cache, Duration::from_secs(30)).expect("answered");
    assert_eq!(report.moved_out, 1, "{report:?}");
    assert!(!content.is_cached(x) && content.has(x));
}

#[test]
fn raising_copies_replicates_content_that_is_only_on_one_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let x;
    {
        let nodes = Arc::new(Nodes::new(vec![link("a", &a), link("b", &b)], 1));
        let content = Content::open(&cache, 1 << 20, nodes).expect("open");
        x = upload(&content, "x", &data(2 << 20, 3));
        content.evict_now();
        assert_eq!(content.placements(x).expect("placements").len(), 1);
        assert!(!content.is_cached(x));
    }
    let nodes = Arc::new(Nodes::new(vec![link("a", &a), link("b", &b)], 2));
    let content = Content::open(&cache, 1 << 20, nodes).expect("reopen");
    let report = content.rebalance();
    assert_eq!(report.replicated, 1, "{report:?}");
    assert_eq!(content.placements(x).expect("placements").len(), 2);
    assert!(!content.is_cached(x), "replicated through a temp copy, not into the cache");
}

#[test]
fn with_every_node_down_content_stays_in_the_cache_over_quota() {
    let dir = tempfile::tempdir().expect("tempdir");
    let connector = || -> io::Result<Transport> { Err(io::Error::other("no ssh here")) };
    let down = NodeLink::with_connector("down", 0, LinkOptions::default(), Box::new(connector));
    let content = Content::open(&dir.path().join("cache"), 1 << 20, Arc::new(Nodes::new(vec![down], 1))).expect("open");
    let bytes = data(2 << 20, 9);
    let x = upload(&content, "x", &bytes);
    assert_eq!(content.evict_now(), 0);
    assert!(content.is_cached(x) && content.placements(x).expect("placements").is_empty());
    assert_eq!(read_all(&content, x), bytes);
}
