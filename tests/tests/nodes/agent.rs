//! `chimed node` fed directly (no ssh): garbage, random frames and an oversized length. It must
//! answer with well-formed frames, never panic, and leave no temp files behind.

use chime_tests::daemon::binary;
use chimed::node::proto::{self, ErrorCode, Reply, Request, VERSION};
use rand::{Rng, RngCore, SeedableRng};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An agent process with its replies read on a thread (it must never block on a full stdout).
struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: mpsc::Receiver<(u32, Reply)>,
    reader: Option<JoinHandle<Result<(), String>>>,
    stderr: Option<JoinHandle<String>>,
}

impl Agent {
    fn start(root: &Path) -> Agent {
        let mut child = Command::new(binary("chimed"))
            .args(["node", "--root"])
            .arg(root)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chimed node");
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (send, replies) = mpsc::channel();
        let reader = std::thread::spawn(move || loop {
            match proto::read_frame(&mut stdout) {
                Ok(Some(raw)) => {
                    let id = raw.id;
                    let reply = Reply::decode(raw).map_err(|e| format!("the agent sent a bad frame: {e}"))?;
                    let _ = send.send((id, reply));
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("the agent's stdout is not frames: {e}")),
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Agent { child, stdin, replies, reader: Some(reader), stderr: Some(stderr) }
    }

    fn write(&mut self, bytes: &[u8]) {
        // A write may fail once the agent has ended the session; what it answered is checked.
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(bytes);
        }
    }

    /// Waits for the reply to `id`, skipping others; panics after `timeout`.
    fn reply_to(&self, id: u32, timeout: Duration) -> Reply {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok((got, reply)) if got == id => return reply,
                Ok(_) => {}
                Err(e) => panic!("no reply to {id} within {timeout:?}: {e}"),
            }
        }
    }

    /// Closes stdin and waits (bounded) for the exit; returns the exit code and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the agent did not exit within 20 s of the end of its stdin");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let read = self.reader.take().expect("reader").join().expect("reader thread");
        assert_eq!(read, Ok(()));
        let stderr = self.stderr.take().expect("stderr").join().expect("stderr thread");
        (status.code(), stderr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn text_before_hello_ends_the_session_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = Agent::start(&dir.path().join("root"));
    agent.write(b"Hello, is this the storage node?\n");
    let Reply::Error(e) = agent.reply_to(0, Duration::from_secs(10)) else { panic!("an error on id 0") };
    assert_eq!(e.code, ErrorCode::TOO_LARGE, "{e:?}");
    let (code, stderr) = agent.finish();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let mut agent = Agent::start(&dir.path().join("root"));
    agent.write(&Request::Space.encode(1));
    let Reply::Error(e) = agent.reply_to(0, Duration::from_secs(10)) else { panic!("an error on id 0") };
    assert_eq!(e.code, ErrorCode::HANDSHAKE);
    assert_eq!(agent.finish().0, Some(1));
}

/// A random frame: a known client type with a body of the right or a random length, or any
/// type at all; ids from a small range so that frames hit open transfers.
fn random_frame(rng: &mut impl RngCore) -> Vec<u8> {
    let id: u32 = rng.random_range(1..=40);
    let known = [(0x01, 10), (0x02, 40), (0x03, 0), (0x04, 0), (0x05, 48), (0x06, 4), (0x07, 0), (0x08, 32)];
    let more = [(0x09, 32), (0x0a, 0), (0x0b, 37), (0x0c, 33)];
    let (ty, right_len) = if rng.random_bool(0.8) {
        let all: Vec<(u8, usize)> = known.iter().chain(more.iter()).copied().collect();
        all[rng.random_range(0..all.len())]
    } else {
        (rng.random::<u8>(), 0)
    };
    let len = match rng.random_range(0..10) {
        0..=6 if ty == 0x03 => rng.random_range(1..3000),
        0..=6 => right_len,
        _ => rng.random_range(0..64),
    };
    let mut body = vec![0u8; len];
    rng.fill_bytes(&mut body);
    if ty == 0x02 && len == 40 && rng.random_bool(0.7) {
        // A size the store can take, so that the PUT opens and DATA finds it.
        body[32..].copy_from_slice(&rng.random_range(0..50_000u64).to_be_bytes());
    }
    if (ty == 0x0b || ty == 0x0c) && len > 0 && rng.random_bool(0.7) {
        body[0] = rng.random_range(0..2);
    }
    let mut frame = ((5 + len) as u32).to_be_bytes().to_vec();
    frame.push(ty);
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

#[test]
fn random_frames_are_answered_and_an_oversized_length_ends_the_session_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let mut agent = Agent::start(&root);
    agent.write(&Request::Hello { version: VERSION }.encode(0));
    assert!(matches!(agent.reply_to(0, Duration::from_secs(10)), Reply::Welcome(_)));

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for _ in 0..3000 {
        let frame = random_frame(&mut rng);
        agent.write(&frame);
    }
    // Still serving.
    agent.write(&Request::Space.encode(1_000_000));
    assert!(matches!(agent.reply_to(1_000_000, Duration::from_secs(20)), Reply::Usage(_)));

    // A length over the maximum: the stream cannot be trusted any more.
    agent.write(&(proto::MAX_FRAME + 1).to_be_bytes());
    agent.write(&[0; 64]);
    let Reply::Error(e) = agent.reply_to(0, Duration::from_secs(10)) else { panic!("an error on id 0") };
    assert_eq!(e.code, ErrorCode::TOO_LARGE);
    let (code, stderr) = agent.finish();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Uploads the random frames opened were removed when the session ended.
    let temps = std::fs::read_dir(root.join("tmp")).expect("tmp").count();
    assert_eq!(temps, 0);
}
