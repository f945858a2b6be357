//! Failures: ssh or the agent killed mid-transfer, a node whose sshd is gone, a node that never
//! answers. Each must fail fast with a retryable error and leave the rest working.

use crate::util::{node, object_files, options, random_file, wait_for};
use chime_tests::sshd::{self, Sshd};
use chimed::config::NodeConfig;
use chimed::node::{LinkOptions, NodeError, NodeLink, Nodes, Reachability};
use std::io::{self, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A writer that kills a process when the first chunk arrives, then takes everything.
struct KillsOnFirstWrite(Option<u32>);

impl Write for KillsOnFirstWrite {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(pid) = self.0.take() {
            sshd::kill9(pid);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn killing_ssh_mid_download_fails_it_retryably_and_the_link_reopens() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd, dir.path(), "n1");
    let size = 8 << 20;
    let (path, sha) = random_file(dir.path(), "f", size, 7);
    n1.link.put(&path, sha, size).expect("put");
    let first = n1.link.ssh_pid().expect("a session");

    let started = Instant::now();
    let err = n1.link.get(sha, 0, None, &mut KillsOnFirstWrite(Some(first))).expect_err("ssh was killed");
    assert!(err.is_retryable(), "{err}");
    assert!(matches!(err, NodeError::Lost { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "noticed in {:?}", started.elapsed());
    assert!(matches!(n1.link.reachability(), Reachability::Down { .. }));

    // The next call opens a new session and succeeds.
    let mut back = Vec::new();
    assert_eq!(n1.link.get(sha, 0, None, &mut back).expect("get after the kill"), size);
    assert_eq!(chimed::node::Sha256::digest(&back), sha);
    let second = n1.link.ssh_pid().expect("a new session");
    assert_ne!(first, second);
    assert!(matches!(n1.link.reachability(), Reachability::Up { .. }));
}

#[test]
fn killing_the_agent_mid_upload_leaves_no_object_and_the_retry_stores_it() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd, dir.path(), "n1");
    let size = 64 << 20;
    let (path, sha) = random_file(dir.path(), "f", size, 8);
    n1.link.connect().expect("connect");

    // Kill the agent as soon as its temp file holds data: the node dies mid-upload.
    let tmp = n1.root.join("tmp");
    let root = n1.root.clone();
    let killed = Arc::new(AtomicBool::new(false));
    let killer = {
        let killed = killed.clone();
        std::thread::spawn(move || {
            wait_for("an upload in progress", Duration::from_secs(30), || {
                std::fs::read_dir(&tmp)
                    .map(|entries| entries.flatten().any(|e| e.metadata().is_ok_and(|m| m.len() > 0)))
                    .unwrap_or(false)
            });
            for pid in sshd::agent_pids(&root) {
                sshd::kill9(pid);
            }
            killed.store(true, Ordering::SeqCst);
        })
    };
    let err = n1.link.put(&path, sha, size).expect_err("the agent died");
    killer.join().expect("killer");
    assert!(killed.load(Ordering::SeqCst));
    assert!(err.is_retryable(), "{err}");
    // Half an upload is never an object.
    assert_eq!(object_files(&n1.root), 0);
    assert_eq!(n1.link.stat(sha).expect("stat through a new session"), None);
    // The retry goes through.
    assert!(!n1.link.put(&path, sha, size).expect("retry").existed);
    assert_eq!(n1.link.stat(sha).expect("stat"), Some(size));
}

#[test]
fn a_node_whose_sshd_is_gone_is_unreachable_and_the_other_still_works() {
    let Some(sshd_a) = Sshd::start_or_skip() else { return };
    let Some(mut sshd_b) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd_a, dir.path(), "n1");
    let n2 = node(&sshd_b, dir.path(), "n2");
    n1.link.connect().expect("n1 up");
    n2.link.connect().expect("n2 up");

    sshd_b.stop();
    // The first call may still find the dying session; within three calls the node is
    // reported unreachable, each call answered quickly.
    let mut last = None;
    for _ in 0..3 {
        let started = Instant::now();
        let err = n2.link.space().expect_err("n2 is gone");
        assert!(started.elapsed() < Duration::from_secs(5), "{err} took {:?}", started.elapsed());
        assert!(err.is_retryable(), "{err}");
        let unreachable = matches!(err, NodeError::Unreachable { .. });
        last = Some(err);
        if unreachable {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let err = last.expect("an error");
    assert!(matches!(err, NodeError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("Connection refused"), "the reason is ssh's: {err}");
    let Reachability::Down { reason, .. } = n2.link.reachability() else { panic!("n2 is down") };
    assert!(reason.contains("Connection refused"), "{reason}");

    // n1 is unaffected, and the choice of a node leaves n2 out.
    let (path, sha) = random_file(dir.path(), "f", 100_000, 9);
    n1.link.put(&path, sha, 100_000).expect("n1 still works");
    let nodes = Nodes::new(vec![n1.link.clone(), n2.link.clone()], 1);
    let answers = nodes.refresh();
    assert!(answers[0].is_ok() && answers[1].is_err());
    let chosen: Vec<&str> = nodes.choose(1 << 20, &[]).iter().map(|l| l.name()).collect();
    assert_eq!(chosen, ["n1"]);
}

#[test]
fn a_node_that_never_answers_is_declared_down_within_the_timeout() {
    // Accepts TCP connections and never says a word, like a host whose sshd is wedged.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let hole = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok((stream, _)) = listener.accept() {
                    held.push(stream);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let config = NodeConfig {
        name: "silent".into(),
        ssh: "127.0.0.1".into(),
        ssh_options: vec![
            "-F".into(),
            "/dev/null".into(),
            "-p".into(),
            port.to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
        ],
        root: "/nonexistent".into(),
        agent: "chimed".into(),
        priority: 0,
    };
    let timeout = Duration::from_secs(3);
    let link = NodeLink::new(&config, LinkOptions { connect_timeout: timeout, ..options() });
    let started = Instant::now();
    let err = link.space().expect_err("nobody answers");
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    hole.join().expect("black hole");
    assert!(matches!(err, NodeError::Unreachable { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(took < timeout + Duration::from_secs(3), "declared down after {took:?}");
    println!("a silent node was declared down after {took:?}: {err}");
}

#[test]
fn a_login_shell_that_prints_or_a_missing_agent_is_reported_as_such() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    // The agent command goes to the remote shell as written: this one prints a banner first,
    // as a chatty .bashrc would.
    let mut chatty = sshd.node("chatty", &dir.path().join("chatty"));
    chatty.agent = format!("echo Welcome to node1; {}", chatty.agent);
    let err = NodeLink::new(&chatty, options()).space().expect_err("garbage on stdout");
    let text = err.to_string();
    println!("{text}");
    assert!(text.contains("Welc") && text.contains("login shell print"), "{text}");

    let mut missing = sshd.node("missing", &dir.path().join("missing"));
    missing.agent = "/nonexistent/chimed".into();
    let err = NodeLink::new(&missing, options()).space().expect_err("no agent");
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, NodeError::Unreachable { .. }), "{text}");
    assert!(text.contains("status 127") && text.contains("/nonexistent/chimed"), "{text}");
}
