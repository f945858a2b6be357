//! Shared helpers: the both-stores macro, raw-socket connections, pipelined posting, history
//! reads, push waiting, and running or tailing the `chime` CLI.

use bytes::BytesMut;
use chime_client::blocking::{Client, ClientError};
use chime_protocol::{
    ClientFrame, Delta, FrameDecoder, FrameType, Hello, Post, RawFrame, RoomId, Seq, ServerFrame, MAGIC,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use chime_tests::daemon::Daemon;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Defines `mod NAME { #[test] fn sqlite(); #[test] fn postgres() }` calling `NAME(Backend)`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    super::$name(chime_tests::daemon::Backend::Sqlite)
                }
                #[test]
                fn postgres() {
                    super::$name(chime_tests::daemon::Backend::Postgres)
                }
            }
        )*
    };
}

/// Serializes the tests that load the machine heavily (100 MB transfers) with the tests whose
/// timing a loaded machine upsets (write timeouts, memory given back): in one test process they
/// would otherwise run at the same time. Hold the guard for the whole test.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A unique-ish suffix for names created outside the harness (CLI registrations).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    format!("{prefix}{}x{}", std::process::id() % 10_000, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Waits for the next push of `room` on `client`, skipping other frames; panics after `timeout`.
pub fn next_delta(client: &mut Client, room: impl Into<RoomId>, timeout: Duration) -> Delta {
    let room = room.into();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no push for room {room} within {timeout:?}");
        match client.recv(Some(left)) {
            Ok(Some((0, ServerFrame::Delta(d)))) if d.room == room => return d,
            Ok(_) => {}
            Err(e) => panic!("waiting for a push of room {room}: {e:?}"),
        }
    }
}

/// Collects pushes of `room` until one with `seq >= last` arrives; panics after `timeout`.
pub fn pushes_until(
    client: &mut Client,
    room: impl Into<RoomId>,
    last: impl Into<Seq>,
    timeout: Duration,
) -> Vec<Delta> {
    let (room, last) = (room.into(), last.into());
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    while got.last().is_none_or(|d: &Delta| d.seq < last) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "pushes of room {room} stopped at seq {:?}, wanted {last}",
            got.last().map(|d: &Delta| d.seq)
        );
        match client.recv(Some(left)) {
            Ok(Some((0, ServerFrame::Delta(d)))) if d.room == room => got.push(d),
            Ok(_) => {}
            Err(e) => panic!("waiting for pushes of room {room}: {e:?}"),
        }
    }
    got
}

/// Asserts `seqs` is exactly `first..=last`.
pub fn assert_contiguous(what: &str, seqs: &[u64], first: u64, last: u64) {
    let expected: Vec<u64> = (first..=last).collect();
    if seqs != expected.as_slice() {
        let mut seen = HashMap::new();
        for s in seqs {
            *seen.entry(*s).or_insert(0) += 1;
        }
        let missing: Vec<u64> = expected.iter().copied().filter(|s| !seen.contains_key(s)).take(20).collect();
        let dups: Vec<u64> = seen.iter().filter(|(_, n)| **n > 1).map(|(s, _)| *s).take(20).collect();
        panic!(
            "{what}: expected seqs {first}..={last} once each in order; got {} seqs, missing {missing:?}, \
             duplicated {dups:?}, first 10 {:?}",
            seqs.len(),
            &seqs[..seqs.len().min(10)]
        );
    }
}

/// Posts every text, keeping up to 200 POSTs in flight; returns their seqs in text order.
pub fn post_pipelined(client: &mut Client, room: impl Into<RoomId>, texts: &[String]) -> Vec<u64> {
    post_with_window(client, room, texts, 200)
}

/// Posts every text, keeping up to `window` POSTs in flight; returns their seqs in text order.
pub fn post_with_window(client: &mut Client, room: impl Into<RoomId>, texts: &[String], window: usize) -> Vec<u64> {
    let room = room.into();
    let mut seqs = vec![0u64; texts.len()];
    let mut pending: HashMap<u32, usize> = HashMap::new();
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < texts.len() || !pending.is_empty() {
        while next < texts.len() && pending.len() < window {
            let frame = ClientFrame::Post(Post {
                room,
                idempotency_key: chime_client::new_idempotency_key(),
                text: texts[next].clone(),
            });
            let id = client.send(&frame).unwrap_or_else(|e| panic!("sending a POST: {e:?}"));
            pending.insert(id, next);
            next += 1;
        }
        assert!(Instant::now() < deadline, "pipelined posts not acknowledged within 120 s");
        match client.recv(Some(Duration::from_secs(10))) {
            Ok(Some((id, ServerFrame::Posted(p)))) => {
                let i = pending.remove(&id).unwrap_or_else(|| panic!("POSTED for unknown request {id}"));
                seqs[i] = p.seq.get();
            }
            Ok(Some((id, ServerFrame::Error(e)))) if pending.contains_key(&id) => panic!("POST refused: {e}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("no POSTED within 10 s ({} in flight)", pending.len()),
            Err(e) => panic!("pipelined posting: {e:?}"),
        }
    }
    seqs
}

/// Every delta of `room`, by HISTORY pages.
pub fn history_all(client: &mut Client, room: impl Into<RoomId>) -> Vec<Delta> {
    let room = room.into();
    let mut all: Vec<Delta> = Vec::new();
    let mut after = Seq(0);
    for _ in 0..10_000 {
        let page = client.history(room, after, 500).unwrap_or_else(|e| panic!("HISTORY: {e:?}"));
        all.extend(page.deltas.iter().cloned());
        if page.deltas.is_empty() || !page.more {
            return all;
        }
        after = page.resume_after;
    }
    panic!("HISTORY of room {room} did not end after 10,000 pages");
}

/// The current head seq of `room` (from LIST_ROOMS; the client must be a member).
pub fn head_seq(client: &mut Client, room: impl Into<RoomId>) -> u64 {
    let room = room.into();
    let rooms = client.list_rooms().unwrap_or_else(|e| panic!("LIST_ROOMS: {e:?}"));
    match rooms.iter().find(|r| r.room == room) {
        Some(r) => r.head_seq.get(),
        None => panic!("room {room} not in LIST_ROOMS"),
    }
}

/// The server error code of a failed request, or a panic saying what happened instead.
pub fn server_code<T: std::fmt::Debug>(what: &str, result: Result<T, ClientError>) -> chime_protocol::ErrorCode {
    match result {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("{what}: expected an ERROR reply, got {other:?}"),
    }
}

/// Runs a CLI command to completion (bounded), asserts exit 0, and parses each stdout line as JSON.
pub fn cli_ok(mut cmd: Command) -> Vec<Value> {
    let (code, stdout, stderr) = cli_run(&mut cmd);
    assert_eq!(code, Some(0), "{cmd:?} failed: stderr: {stderr}\nstdout: {stdout}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{cmd:?} printed a non-JSON line {l:?}: {e}")))
        .collect()
}

/// Runs a CLI command with a 30 s limit; returns its exit code, stdout and stderr.
pub fn cli_run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut out = child.stdout.take().map(drain_in_thread);
    let mut err = child.stderr.take().map(drain_in_thread);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} did not finish within 30 s");
            }
        }
    };
    let join = |h: Option<std::thread::JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    (status.code(), join(out.take()), join(err.take()))
}

fn drain_in_thread<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Asserts a JSON value is a non-negative integer and returns it.
pub fn json_u64(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or_else(|| panic!("{v}: \"{key}\" is not an integer"))
}

/// Asserts a JSON value's field is a string and returns it.
pub fn json_str<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_else(|| panic!("{v}: \"{key}\" is not a string"))
}

/// Checks the delta shape of interface.md: room, seq, kind, author, ts (RFC 3339), text.
pub fn assert_delta_shape(v: &Value, room: impl Into<RoomId>) -> u64 {
    let room = room.into().get();
    assert_eq!(json_u64(v, "room"), room, "{v}");
    let seq = json_u64(v, "seq");
    assert!(seq >= 1, "{v}");
    let kind = json_str(v, "kind");
    assert!(["create", "message", "join", "leave"].contains(&kind), "{v}: unexpected kind");
    json_str(v, "author");
    json_str(v, "text");
    let ts = json_str(v, "ts");
    assert!(is_rfc3339(ts), "{v}: ts is not RFC 3339");
    seq
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)`.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|x| x.iter().all(u8::is_ascii_digit));
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b'T' | b't')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    matches!(rest, "Z" | "z")
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':'
            && rest[1..3].bytes().chain(rest[4..6].bytes()).all(|c| c.is_ascii_digit()))
}

/// A running `chime tail` whose stdout lines arrive on a channel. Killed on drop.
pub struct Tail {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Tail {
    /// Spawns `cmd` (a `chime ... tail ...` command).
    pub fn spawn(mut cmd: Command) -> Tail {
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawning tail: {e}"));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("tail has no stdout"));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = drain_in_thread(child.stderr.take().unwrap_or_else(|| panic!("tail has no stderr")));
        Tail { child, lines: rx, stderr: Some(stderr) }
    }

    /// Registers a new CLI user in `home`, joins `room` and follows it with `chime tail ROOM
    /// --after 0` (the whole log, then live).
    pub fn follow_room(d: &Daemon, home: &Path, room: impl Into<RoomId>) -> Tail {
        let room = room.into();
        let mut cmd = d.cli(home);
        cmd.args(["register", &unique("tailer")]);
        cli_ok(cmd);
        let mut cmd = d.cli(home);
        cmd.args(["room", "join", &room.to_string()]);
        cli_ok(cmd);
        let mut cmd = d.cli(home);
        cmd.args(["tail", &room.to_string(), "--after", "0"]);
        Tail::spawn(cmd)
    }

    /// The next stdout line as JSON, or `None` after `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<Value> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("tail printed a non-JSON line {line:?}: {e}")))
    }

    /// Reads delta lines until one with `seq >= last`; returns them all. Panics after `timeout`,
    /// with the tail's stderr.
    pub fn until_seq(&mut self, room: impl Into<RoomId>, last: impl Into<Seq>, timeout: Duration) -> Vec<Value> {
        let (room, last) = (room.into().get(), last.into().get());
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Value> = Vec::new();
        while got.last().is_none_or(|v| json_u64(v, "seq") < last) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(v) => {
                    assert_delta_shape(&v, room);
                    got.push(v);
                }
                None => {
                    let status = self.child.try_wait();
                    panic!(
                        "tail stopped at seq {:?} (wanted {last}); process status {status:?}",
                        got.last().map(|v| json_u64(v, "seq"))
                    );
                }
            }
        }
        got
    }

    /// Kills the tail and returns its stderr.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a raw connection read.
#[derive(Debug)]
pub enum Got {
    /// A whole frame.
    Frame(RawFrame),
    /// The server closed the stream (EOF or reset).
    Closed,
    /// Nothing within the timeout.
    Timeout,
}

/// A raw TCP connection for sending arbitrary bytes and reading raw frames.
pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl RawConn {
    /// Connects (bounded).
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("raw connect to {addr}: {e}"));
        RawConn { stream, buf: BytesMut::new(), decoder: FrameDecoder::new(u32::MAX) }
    }

    /// Writes bytes; a write error means the server already closed, which callers may expect.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes a typed frame.
    pub fn send(&mut self, frame: &ClientFrame, request_id: u32) {
        self.write(&frame.encode(request_id).expect("small frame")).unwrap_or_else(|e| panic!("raw write: {e}"));
    }

    /// Sends HELLO and expects WELCOME.
    pub fn handshake(&mut self) {
        self.send(
            &ClientFrame::Hello(Hello {
                magic: MAGIC,
                max_version: PROTOCOL_VERSION,
                min_version: MIN_PROTOCOL_VERSION,
                client_name: "raw".into(),
                client_version: "0".into(),
            }),
            1,
        );
        match self.recv(Duration::from_secs(5)) {
            Got::Frame(f) if f.ty == FrameType::WELCOME => {}
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Reads one frame within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(f)) => return Got::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("server sent an undecodable frame: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Timeout;
            }
            let _ = self.stream.set_read_timeout(Some(left));
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Got::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return Got::Closed,
            }
        }
    }

    /// Reads frames until the stream closes; returns them. Panics if still open after `timeout`.
    pub fn until_closed(&mut self, timeout: Duration) -> Vec<RawFrame> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Got::Frame(f) => frames.push(f),
                Got::Closed => return frames,
                Got::Timeout => panic!("connection still open after {timeout:?}; frames: {frames:?}"),
            }
        }
    }
}

/// The body of an ERROR frame.
pub fn error_code(frame: &RawFrame) -> Option<chime_protocol::ErrorCode> {
    match ServerFrame::decode(frame) {
        Ok(ServerFrame::Error(e)) => Some(e.code),
        Ok(ServerFrame::Goodbye(g)) => Some(g.code),
        _ => None,
    }
}
