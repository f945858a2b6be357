//! Runs the built `chime` binary against a scripted fake server on loopback (plaintext), to
//! check what the real daemon cannot force on demand: `tail` filling a gap in live pushes,
//! dropping duplicates and resuming from its last printed seq after the connection dies, and
//! `send` retrying with the same idempotency key, and server-chosen text (bidi overrides,
//! invisible format characters) reaching the terminal only escaped. Each script asserts what the
//! client sends.

use chime_protocol::{
    frame, Authed, CreateBody, Delta, DeltaBody, DeltaPage, ErrorBody, ErrorCode, FrameType, History, Limits, Post,
    Posted, RoomCursor, RoomId, Seq, Sync, SyncDone, UserId, Welcome,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// How long any step may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

/// One accepted connection of the fake server.
struct Conn(TcpStream);

impl Conn {
    fn accept(listener: &TcpListener) -> Conn {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(STEP)).expect("timeout");
        Conn(stream)
    }

    /// Reads one frame and decodes its body as `T`, asserting its type.
    fn expect<T: DeserializeOwned>(&mut self, want: FrameType) -> (u32, T) {
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).expect("frame length");
        let mut rest = vec![0u8; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut rest).expect("frame");
        let ty = FrameType(u16::from_be_bytes([rest[0], rest[1]]));
        assert_eq!(ty, want, "the client sent {ty} instead of {want}");
        let id = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]);
        (id, frame::decode_body(ty, &rest[6..]).expect("body"))
    }

    fn reply<T: Serialize>(&mut self, ty: FrameType, id: u32, body: &T) {
        self.0.write_all(&frame::encode(ty, id, body).expect("small frame")).expect("write");
    }

    fn push(&mut self, delta: Delta) {
        self.reply(FrameType::DELTA, 0, &delta);
    }

    /// HELLO / WELCOME, then RESUME / AUTHED.
    fn handshake(&mut self) {
        let (id, _): (u32, chime_protocol::Hello) = self.expect(FrameType::HELLO);
        let welcome = Welcome {
            protocol_version: chime_protocol::PROTOCOL_VERSION,
            server_name: "fake".into(),
            server_version: "0".into(),
            min_version: chime_protocol::MIN_PROTOCOL_VERSION,
            max_version: chime_protocol::PROTOCOL_VERSION,
            limits: Limits::default(),
        };
        self.reply(FrameType::WELCOME, id, &welcome);
        let (id, resume): (u32, chime_protocol::Resume) = self.expect(FrameType::RESUME);
        assert_eq!(resume.token, "tok");
        self.reply(FrameType::AUTHED, id, &Authed { user_id: UserId(1), user: "alice".into(), token: None });
    }

    /// Answers a SYNC of room 1 that must start after `from` with the deltas `seqs`.
    fn sync(&mut self, from: u64, seqs: std::ops::RangeInclusive<u64>) {
        let (id, sync): (u32, Sync) = self.expect(FrameType::SYNC);
        assert_eq!(sync.rooms, [RoomCursor { room: RoomId(1), seq: Seq(from) }]);
        let last = *seqs.end();
        let page =
            DeltaPage { room: RoomId(1), deltas: seqs.map(delta).collect(), more: false, resume_after: Seq(last) };
        self.reply(FrameType::DELTA_PAGE, id, &page);
        self.reply(FrameType::SYNC_DONE, id, &SyncDone { heads: vec![RoomCursor { room: RoomId(1), seq: Seq(last) }] });
    }
}

fn delta(seq: u64) -> Delta {
    Delta {
        room: RoomId(1),
        seq: Seq(seq),
        author_id: UserId(1),
        author: "alice".into(),
        ts_ms: 1_795_341_600_000 + seq as i64,
        body: DeltaBody::message(format!("message {seq}")),
    }
}

/// A listener and a home holding a session for it.
fn setup() -> (TcpListener, String, tempfile::TempDir) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let home = tempfile::tempdir().expect("temp dir");
    let sessions = format!(r#"{{"{addr}":{{"token":"tok","user":"alice","user_id":1}}}}"#);
    std::fs::write(home.path().join("sessions.json"), sessions).expect("sessions");
    (listener, addr, home)
}

/// Runs `chime` against the fake server: human output unless `args` hold `--json`.
fn chime(home: &Path, addr: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chime"))
        .arg("--home")
        .arg(home)
        .args(["--server", addr, "--plaintext"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chime")
}

#[test]
fn tail_fills_gaps_drops_duplicates_and_resumes_after_a_disconnect() {
    let (listener, addr, home) = setup();
    let server = thread::spawn(move || {
        let mut first = Conn::accept(&listener);
        first.handshake();
        first.sync(0, 1..=2);
        first.push(delta(3));
        first.push(delta(5)); // 4 was lost: the client must SYNC from 3
        first.sync(3, 4..=5);
        first.push(delta(5)); // a duplicate
        drop(first); // the daemon "restarts"

        let mut second = Conn::accept(&listener);
        second.handshake();
        second.sync(5, 6..=7); // resumes from the last printed seq
        second.push(delta(7));
        second.push(delta(8));
        second
    });

    let mut child = chime(home.path(), &addr, &["--json", "tail", "1", "--after", "0"]);
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.expect("line")).is_err() {
                break;
            }
        }
    });
    let mut seqs = Vec::new();
    while seqs.last() != Some(&8) {
        let Ok(line) = lines_rx.recv_timeout(STEP) else { break };
        let value: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
        assert_eq!(value["room"], 1);
        assert_eq!(value["kind"], "message");
        seqs.push(value["seq"].as_u64().expect("seq"));
    }
    // Anything printed after 8 would be a duplicate; give it a moment to show up.
    thread::sleep(Duration::from_millis(200));
    for extra in lines_rx.try_iter() {
        let value: serde_json::Value = serde_json::from_str(&extra).expect("one JSON object per line");
        seqs.push(value["seq"].as_u64().expect("seq"));
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
    let conn = server.join().expect("fake server script");
    drop(conn);
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
}

#[test]
fn send_retries_with_the_same_idempotency_key() {
    let (listener, addr, home) = setup();
    let server = thread::spawn(move || {
        let mut first = Conn::accept(&listener);
        first.handshake();
        let (_, post): (u32, Post) = first.expect(FrameType::POST);
        assert_eq!((post.room, post.text.as_str()), (RoomId(1), "hello there"));
        drop(first); // lost before the reply

        let mut second = Conn::accept(&listener);
        second.handshake();
        let (id, retry): (u32, Post) = second.expect(FrameType::POST);
        assert_eq!(retry, post);
        second.reply(FrameType::POSTED, id, &Posted { room: RoomId(1), seq: Seq(9), ts_ms: 0, duplicate: true });
    });
    let child = chime(home.path(), &addr, &["--json", "send", "1", "hello", "there"]);
    let output = child.wait_with_output().expect("wait");
    server.join().expect("fake server script");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "{\"room\":1,\"seq\":9}\n");
}

#[test]
fn a_server_refusal_is_one_line_with_its_code() {
    let (listener, addr, home) = setup();
    let server = thread::spawn(move || {
        let mut conn = Conn::accept(&listener);
        conn.handshake();
        let (id, history): (u32, History) = conn.expect(FrameType::HISTORY);
        assert_eq!((history.room, history.after), (RoomId(3), Seq(0)));
        let refusal = ErrorBody::new(ErrorCode::NOT_MEMBER, "not a member of room 3");
        conn.reply(FrameType::ERROR, id, &refusal);
    });
    let child = chime(home.path(), &addr, &["--json", "history", "3"]);
    let output = child.wait_with_output().expect("wait");
    server.join().expect("fake server script");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(output.stdout.is_empty());
    assert_eq!(String::from_utf8_lossy(&output.stderr), "chime: not a member of room 3 (NOT_MEMBER)\n");
}

/// A room whose name, creator and first message were chosen to spoof the reader's terminal.
fn spoofing_page() -> DeltaPage {
    let mut create = delta(1);
    create.author = "mal\u{2067}lory".into();
    create.body = DeltaBody::Create(CreateBody { name: "gen\u{200b}eral".into() });
    let mut message = delta(2);
    message.author = "mal\u{2067}lory".into();
    message.body = DeltaBody::message("open invoice\u{202e}fdp.exe please");
    DeltaPage { room: RoomId(1), deltas: vec![create, message], more: false, resume_after: Seq(2) }
}

#[test]
fn history_escapes_format_characters_for_people_and_keeps_them_in_json() {
    let (listener, addr, home) = setup();
    let server = thread::spawn(move || {
        for _ in 0..2 {
            let mut conn = Conn::accept(&listener);
            conn.handshake();
            let (id, history): (u32, History) = conn.expect(FrameType::HISTORY);
            assert_eq!((history.room, history.after), (RoomId(1), Seq(0)));
            conn.reply(FrameType::DELTA_PAGE, id, &spoofing_page());
        }
    });

    let human = chime(home.path(), &addr, &["history", "1"]).wait_with_output().expect("wait");
    assert_eq!(human.status.code(), Some(0), "{human:?}");
    let stdout = String::from_utf8(human.stdout).expect("utf-8");
    for raw in ['\u{202e}', '\u{2067}', '\u{200b}'] {
        assert!(!stdout.contains(raw), "raw {raw:?} in {stdout:?}");
    }
    assert_eq!(
        stdout,
        "[#1 1] 2026-11-22T10:00:00.001Z * mal\\u{2067}lory created the room \"gen\\u{200b}eral\"\n\
         [#1 2] 2026-11-22T10:00:00.002Z mal\\u{2067}lory: open invoice\\u{202e}fdp.exe please\n"
    );

    let json = chime(home.path(), &addr, &["--json", "history", "1"]).wait_with_output().expect("wait");
    server.join().expect("fake server script");
    assert_eq!(json.status.code(), Some(0), "{json:?}");
    let records: Vec<serde_json::Value> = String::from_utf8(json.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["author"], "mal\u{2067}lory");
    assert_eq!(records[0]["text"], "gen\u{200b}eral");
    assert_eq!(records[1]["text"], "open invoice\u{202e}fdp.exe please");
}

#[test]
fn server_words_on_stderr_are_escaped() {
    let (listener, addr, home) = setup();
    let server = thread::spawn(move || {
        let mut conn = Conn::accept(&listener);
        conn.handshake();
        let (id, _): (u32, History) = conn.expect(FrameType::HISTORY);
        let refusal = ErrorBody::new(ErrorCode::NOT_MEMBER, "not a member of \u{202e}3 moor\u{1b}[2J");
        conn.reply(FrameType::ERROR, id, &refusal);
    });
    let output = chime(home.path(), &addr, &["history", "3"]).wait_with_output().expect("wait");
    server.join().expect("fake server script");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "chime: not a member of \\u{202e}3 moor\\u{1b}[2J (NOT_MEMBER)\n"
    );
}
