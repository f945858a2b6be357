//! Files through the real daemon and the real `chime`: uploads in chunks and downloads in a window
//! of chunks over the chat connection, hash checks, resumes from another connection and of a
//! partial download, dedupe in the cache, forward-then-delete and collection, refusals, and chat
//! that is not held up behind a 100 MB transfer on the same connection.

use crate::util::*;
use chime_protocol::{ClientFrame, DeltaBody, Download, DownloadAck, ErrorCode, Seq, ServerFrame};
use chime_tests::daemon::{Backend, Daemon, DaemonOptions};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

on_both_stores!(
    round_trip_dedupe_forward_and_collection,
    resume_after_a_cut_connection_and_a_partial_download,
    resume_after_a_daemon_restart,
    refusals_hash_size_and_strangers
);

fn cli(d: &Daemon, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = d.cli(home);
    cmd.args(args);
    cli_ok(cmd)
}

/// A file of `size` pseudo-random bytes (xorshift, so no two tests share content by accident
/// unless they share `seed`), written in 1 MiB pieces.
fn random_file(dir: &Path, name: &str, size: u64, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let mut f = fs::File::create(&path).expect("create");
    let mut x = seed | 1;
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for b in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    path
}

fn sha_of(path: &Path) -> [u8; 32] {
    let mut f = fs::File::open(path).expect("open");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return h.finalize().into();
        }
        h.update(&buf[..n]);
    }
}

/// Objects in the daemon's cache (complete content only).
fn cached_objects(d: &Daemon) -> usize {
    fn walk(p: &Path) -> usize {
        let Ok(entries) = fs::read_dir(p) else { return 0 };
        entries.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum()
    }
    walk(&d.data_dir().join("cache").join("objects"))
}

fn round_trip_dedupe_forward_and_collection(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "files_round_trip", &[]) else { return };
    let dir = tempfile::tempdir().expect("dir");
    let home = dir.path().join("home");
    let ann = unique("ann");
    cli(&d, &home, &["register", &ann]);
    let room = json_u64(&cli(&d, &home, &["room", "create", "files"])[0], "room");
    let other = json_u64(&cli(&d, &home, &["room", "create", "elsewhere"])[0], "room");
    let (r, o) = (room.to_string(), other.to_string());
    let file = random_file(dir.path(), "data.bin", 3_000_001, 7);
    let sha = hex::encode(sha_of(&file));

    // Round trip: the upload's JSON, the file delta in the log, the download verified.
    let up = cli(&d, &home, &["upload", &r, file.to_str().expect("utf-8"), "--caption", "have a look"]);
    assert_eq!(json_str(&up[0], "sha256"), sha);
    assert_eq!(json_u64(&up[0], "room"), room);
    let (file_id, seq) = (json_u64(&up[0], "file"), json_u64(&up[0], "seq"));
    let log = cli(&d, &home, &["history", &r]);
    let shared = log.iter().find(|v| json_u64(v, "seq") == seq).expect("the file delta");
    assert_eq!(json_str(shared, "kind"), "file");
    assert_eq!((json_u64(shared, "file"), json_u64(shared, "size")), (file_id, 3_000_001));
    assert_eq!((json_str(shared, "name"), json_str(shared, "sha256")), ("data.bin", sha.as_str()));
    assert_eq!(json_str(shared, "text"), "have a look");
    let out = dir.path().join("copy.bin");
    let down = cli(&d, &home, &["download", &file_id.to_string(), "-o", out.to_str().expect("utf-8")]);
    assert_eq!(json_str(&down[0], "sha256"), sha);
    assert_eq!(json_u64(&down[0], "file"), file_id);
    assert_eq!(hex::encode(sha_of(&out)), sha);
    assert!(!dir.path().join("copy.bin.part").exists(), "the part file is renamed once verified");

    // Dedupe: the same bytes again are a second record, one object.
    let again = cli(&d, &home, &["upload", &r, file.to_str().expect("utf-8")]);
    assert_ne!(json_u64(&again[0], "file"), file_id);
    assert_eq!(cached_objects(&d), 1, "same bytes stored once");

    // Forward, then delete the original: the forwarded copy still downloads.
    let fwd = cli(&d, &home, &["forward", &r, &seq.to_string(), &o]);
    assert_eq!(json_u64(&fwd[0], "room"), other);
    let fwd_seq = json_u64(&fwd[0], "seq");
    let copy = cli(&d, &home, &["history", &o]).into_iter().find(|v| json_u64(v, "seq") == fwd_seq).expect("copy");
    assert_eq!(json_str(&copy, "kind"), "file");
    let copy_id = json_u64(&copy, "file");
    assert_ne!(copy_id, file_id, "a forward is a new file record");
    cli(&d, &home, &["delete", &r, &seq.to_string()]);
    let gone = dir.path().join("gone.bin");
    let mut cmd = d.cli(&home);
    cmd.args(["download", &file_id.to_string(), "-o", gone.to_str().expect("utf-8")]);
    let (code, _, stderr) = cli_run(&mut cmd);
    assert_eq!(code, Some(1), "a deleted file's record is gone: {stderr}");
    let fwd_out = dir.path().join("fwd.bin");
    cli(&d, &home, &["download", &copy_id.to_string(), "-o", fwd_out.to_str().expect("utf-8")]);
    assert_eq!(hex::encode(sha_of(&fwd_out)), sha);
    assert_eq!(cached_objects(&d), 1);

    // Delete every message that carries the content: it is collected from the cache.
    cli(&d, &home, &["delete", &r, &json_u64(&again[0], "seq").to_string()]);
    assert_eq!(cached_objects(&d), 1, "the forwarded copy still refers to it");
    cli(&d, &home, &["delete", &o, &fwd_seq.to_string()]);
    assert_eq!(cached_objects(&d), 0, "content with no record left is collected");
}

/// Reads the first `limit` bytes, then fails: a client that dies mid-upload.
struct Cut<R> {
    inner: R,
    limit: u64,
}

impl<R: Read> Read for Cut<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.limit == 0 {
            return Err(std::io::Error::other("cut"));
        }
        let n = (buf.len() as u64).min(self.limit) as usize;
        let n = self.inner.read(&mut buf[..n])?;
        self.limit -= n as u64;
        Ok(n)
    }
}

fn resume_after_a_cut_connection_and_a_partial_download(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "files_resume", &[]) else { return };
    let dir = tempfile::tempdir().expect("dir");
    let mut ann = d.register("ann");
    let room = ann.client.create_room("resume").expect("room").room;
    let size = 2_500_000u64;
    let file = random_file(dir.path(), "big.bin", size, 11);
    let sha = sha_of(&file);

    // The first connection sends about half, then its source fails and the connection is cut.
    let state = ann.client.upload_begin(room, "big.bin", size, "application/octet-stream", sha).expect("begin");
    assert_eq!((state.offset, state.size), (0, size));
    let mut cut = Cut { inner: fs::File::open(&file).expect("open"), limit: size / 2 };
    assert!(ann.client.upload_bytes(&state, &mut cut, &mut |_| {}).is_err(), "the source failed midway");
    drop(ann.client);

    // Another connection of the same user resumes from what the server holds.
    let mut again = d.resume(&ann.token);
    let resumed = again.upload_resume(state.upload).expect("resume");
    assert!(resumed.offset > 0 && resumed.offset <= size / 2, "resumed at {}", resumed.offset);
    let mut src = fs::File::open(&file).expect("open");
    src.seek(SeekFrom::Start(resumed.offset)).expect("seek");
    let mut seen = Vec::new();
    assert_eq!(again.upload_bytes(&resumed, &mut src, &mut |at| seen.push(at)).expect("rest"), size);
    assert!(seen.windows(2).all(|w| w[0] < w[1]) && seen.last() == Some(&size), "progress climbs to the end");
    let stored = again.upload_finish(resumed.upload, "").expect("finish");
    assert_eq!(stored.sha256, sha);
    // A finished upload is no more.
    assert_eq!(server_code("resume a finished upload", again.upload_resume(state.upload)), ErrorCode::NOT_FOUND);

    // A partial download continues from the length of PATH.part.
    let home = dir.path().join("home");
    let mut cmd = d.cli(&home);
    cmd.args(["login", &ann.name]);
    cli_ok(cmd);
    let out = dir.path().join("got.bin");
    let mut part = fs::File::create(dir.path().join("got.bin.part")).expect("part");
    let mut head = vec![0u8; 1_000_000];
    fs::File::open(&file).expect("open").read_exact(&mut head).expect("head");
    part.write_all(&head).expect("write part");
    drop(part);
    let down = cli(&d, &home, &["download", &stored.file.to_string(), "-o", out.to_str().expect("utf-8")]);
    assert_eq!(json_str(&down[0], "sha256"), hex::encode(sha));
    assert_eq!(sha_of(&out), sha);

    // The library asked for a range from the middle gets exactly that range.
    let mut tail = Vec::new();
    let meta = again.download(stored.file, size - 100_000, &mut tail, &mut |_, _| {}).expect("range");
    assert_eq!((meta.offset, meta.length, tail.len() as u64), (size - 100_000, 100_000, 100_000));
}

/// A kill -9 mid-upload: the session is durable, and the offset after the restart is what the
/// staging file holds; FINISH hashes the staged bytes from disk.
fn resume_after_a_daemon_restart(backend: Backend) {
    let Some(mut d) = Daemon::start_backend(backend, "files_restart", &[]) else { return };
    let dir = tempfile::tempdir().expect("dir");
    let mut ann = d.register("ann");
    let room = ann.client.create_room("restart").expect("room").room;
    let size = 1_500_000u64;
    let file = random_file(dir.path(), "r.bin", size, 23);
    let sha = sha_of(&file);
    let state = ann.client.upload_begin(room, "r.bin", size, "", sha).expect("begin");
    let mut cut = Cut { inner: fs::File::open(&file).expect("open"), limit: 700_000 };
    assert!(ann.client.upload_bytes(&state, &mut cut, &mut |_| {}).is_err());
    d.kill9();
    d.restart();
    let mut again = d.resume(&ann.token);
    let resumed = again.upload_resume(state.upload).expect("resume after the restart");
    let staged = fs::metadata(d.data_dir().join("cache").join("uploads").join(format!("upload-{}.part", state.upload)))
        .map_or(0, |m| m.len());
    assert_eq!(resumed.offset, staged, "the offset is what the staging file holds");
    let mut src = fs::File::open(&file).expect("open");
    src.seek(SeekFrom::Start(resumed.offset)).expect("seek");
    again.upload_bytes(&resumed, &mut src, &mut |_| {}).expect("rest");
    let stored = again.upload_finish(state.upload, "").expect("finish after the restart");
    assert_eq!(stored.sha256, sha);
    let mut back = Vec::new();
    again.download(stored.file, 0, &mut back, &mut |_, _| {}).expect("download");
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&back)), sha);
}

fn refusals_hash_size_and_strangers(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("chimed.toml");
    fs::write(&config, "[files]\nmax_size = 1000000\ncache_quota = 10000000\n").expect("config");
    let Some(database) = backend.fresh_database("files_refusals") else { return };
    let opts =
        DaemonOptions { database, ..DaemonOptions::default() }.with_args(["--config", config.to_str().expect("utf-8")]);
    let d = Daemon::start(opts);
    let mut ann = d.register("ann");
    let room = ann.client.create_room("refusals").expect("room").room;

    // Over max_size: refused at BEGIN.
    let big = ann.client.upload_begin(room, "big", 1_000_001, "", [0; 32]);
    assert_eq!(server_code("over max_size", big), ErrorCode::FILE_TOO_LARGE);

    // Bytes that do not hash to what was announced: refused at FINISH, and discarded.
    let data = vec![5u8; 200_000];
    let wrong = [9u8; 32];
    let state = ann.client.upload_begin(room, "x.bin", data.len() as u64, "", wrong).expect("begin");
    ann.client.upload_bytes(&state, &mut &data[..], &mut |_| {}).expect("bytes");
    assert_eq!(server_code("hash mismatch", ann.client.upload_finish(state.upload, "")), ErrorCode::HASH_MISMATCH);
    assert_eq!(ann.client.upload_resume(state.upload).expect("resume").offset, 0, "the bytes were discarded");
    assert_eq!(cached_objects(&d), 0);

    // FINISH before every byte: refused, the upload goes on.
    let good: [u8; 32] = Sha256::digest(&data).into();
    let state = ann.client.upload_begin(room, "y.bin", data.len() as u64, "", good).expect("begin");
    let half = &data[..100_000];
    let partial = chime_protocol::UploadState { size: 100_000, ..state.clone() };
    ann.client.upload_bytes(&partial, &mut &half[..], &mut |_| {}).expect("half");
    let early = ann.client.upload_finish(state.upload, "");
    assert_eq!(server_code("early finish", early), ErrorCode::UPLOAD_INCOMPLETE);
    let resumed = ann.client.upload_resume(state.upload).expect("resume");
    assert_eq!(resumed.offset, 100_000);
    // A chunk at the wrong offset is refused with where the upload stands.
    let wrong_offset = ClientFrame::UploadChunk(chime_protocol::UploadChunk {
        upload: state.upload,
        offset: 50_000,
        data: vec![1; 10],
    });
    assert_eq!(server_code("wrong offset", ann.client.request(&wrong_offset)), ErrorCode::OFFSET_MISMATCH);
    ann.client.upload_bytes(&resumed, &mut &data[100_000..], &mut |_| {}).expect("rest");
    let stored = ann.client.upload_finish(state.upload, "ok").expect("finish");

    // Someone else: not a member of the room, may not download it nor see that it exists, nor
    // resume another's upload, nor upload into the room.
    let mut eve = d.register("eve");
    let mut sink = Vec::new();
    let refused = eve.client.download(stored.file, 0, &mut sink, &mut |_, _| {});
    assert_eq!(server_code("a stranger downloads", refused), ErrorCode::NOT_FOUND);
    let absent = eve.client.download(stored.file + 1000, 0, &mut sink, &mut |_, _| {});
    assert_eq!(server_code("no such file", absent), ErrorCode::NOT_FOUND, "existence is not leaked");
    assert_eq!(server_code("another's upload", eve.client.upload_resume(state.upload)), ErrorCode::NOT_FOUND);
    let into = eve.client.upload_begin(room, "z", 10, "", [0; 32]);
    assert_eq!(server_code("upload into a room not joined", into), ErrorCode::NOT_MEMBER);
    // Once a member, the file is theirs to read.
    eve.client.join_room(room).expect("join");
    let meta = eve.client.download(stored.file, 0, &mut sink, &mut |_, _| {}).expect("member downloads");
    assert_eq!((meta.size, sink.len()), (200_000, 200_000));
    assert!(matches!(history_all(&mut eve.client, room).iter().find(|d| d.seq == Seq(2)).map(|d| &d.body),
        Some(DeltaBody::FileShared(f)) if f.file == stored.file && f.caption == "ok" && f.sha256 == good));
}

/// The same transfer over TLS (the bulk class sits in front of rustls), through the real CLI.
#[test]
fn files_travel_over_tls_too() {
    let d = Daemon::start(DaemonOptions::default());
    let dir = tempfile::tempdir().expect("dir");
    let home = dir.path().join("home");
    let tls = |args: &[&str]| {
        let mut cmd = d.cli_tls(&home);
        cmd.args(args);
        cli_ok(cmd)
    };
    tls(&["register", &unique("tls")]);
    let room = json_u64(&tls(&["room", "create", "tls"])[0], "room");
    let file = random_file(dir.path(), "over-tls.bin", 5_000_000, 31);
    let sha = hex::encode(sha_of(&file));
    let up = tls(&["upload", &room.to_string(), file.to_str().expect("utf-8")]);
    assert_eq!(json_str(&up[0], "sha256"), sha);
    let out = dir.path().join("back.bin");
    let down = tls(&["download", &json_u64(&up[0], "file").to_string(), "-o", out.to_str().expect("utf-8")]);
    assert_eq!(json_str(&down[0], "sha256"), sha);
    assert_eq!(hex::encode(sha_of(&out)), sha);
}

/// 100 MB up and down, verified, with a chat message pushed to the downloading connection while
/// its chunks stream: it overtakes them. SQLite only (the store does a few rows here); the bytes
/// path is the same for both stores.
#[test]
fn a_100_mb_file_and_chat_that_overtakes_it() {
    let _heavy = heavy();
    let d = Daemon::start(DaemonOptions::default());
    let dir = tempfile::tempdir().expect("dir");
    let size = 100u64 << 20;
    let file = random_file(dir.path(), "hundred.bin", size, 101);
    let sha = sha_of(&file);
    let mut ann = d.register("ann");
    let mut bob = d.register("bob");
    let room = ann.client.create_room("big").expect("room").room;
    bob.client.join_room(room).expect("join");

    let started = Instant::now();
    let state = ann.client.upload_begin(room, "hundred.bin", size, "application/octet-stream", sha).expect("begin");
    let mut src = fs::File::open(&file).expect("open");
    ann.client.upload_bytes(&state, &mut src, &mut |_| {}).expect("upload");
    let stored = ann.client.upload_finish(state.upload, "").expect("finish");
    eprintln!("100 MB upload: {:?}; daemon RSS {} KiB", started.elapsed(), d.rss_kib());
    assert_eq!(stored.sha256, sha);

    // ann downloads on her connection by hand, acknowledging as the client library does, while
    // bob posts from another thread; the push must not wait behind the chunks.
    let _ = next_delta(&mut ann.client, room, Duration::from_secs(5));
    let started = Instant::now();
    let id =
        ann.client.send(&ClientFrame::Download(Download { file: stored.file, offset: 0, length: 0 })).expect("send");
    // bob posts once ann has a few MiB, so the push meets a stream of chunks in full flow.
    let (go, went) = std::sync::mpsc::channel::<()>();
    let poster = {
        let mut bob = bob.client;
        std::thread::spawn(move || {
            let _ = went.recv_timeout(Duration::from_secs(60));
            let at = Instant::now();
            bob.post(room, "mid", "still here").expect("post");
            at
        })
    };
    let mut hasher = Sha256::new();
    let (mut got, mut acked, mut meta_seen) = (0u64, 0u64, false);
    let mut chat_at: Option<(Instant, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < size {
        assert!(Instant::now() < deadline, "the download stalled at {got}");
        match ann.client.recv(Some(Duration::from_secs(10))) {
            Ok(Some((rid, ServerFrame::DownloadMeta(m)))) if rid == id => {
                assert_eq!((m.size, m.sha256), (size, sha));
                meta_seen = true;
            }
            Ok(Some((0, ServerFrame::FileChunk(c)))) if c.download == id => {
                assert!(meta_seen, "the metadata comes first");
                assert_eq!(c.offset, got);
                hasher.update(&c.data);
                got += c.data.len() as u64;
                if got >= 8 << 20 && got - (c.data.len() as u64) < 8 << 20 {
                    let _ = go.send(());
                }
                if got - acked >= 512 * 1024 {
                    ann.client
                        .send(&ClientFrame::DownloadAck(DownloadAck { download: id, received: got }))
                        .expect("ack");
                    acked = got;
                }
            }
            Ok(Some((0, ServerFrame::Delta(delta)))) if delta.room == room && delta.text() == "still here" => {
                chat_at = Some((Instant::now(), got));
            }
            Ok(Some(_)) => {}
            other => panic!("download: {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(<[u8; 32]>::from(hasher.finalize()), sha, "the download hashes right");
    eprintln!("100 MB download: {elapsed:?}; daemon RSS {} KiB", d.rss_kib());
    let posted_at = poster.join().expect("poster");
    let (arrived, at_byte) = match chat_at {
        Some(c) => c,
        // The post came after the last chunk: it is next.
        None => {
            let delta = next_delta(&mut ann.client, room, Duration::from_secs(5));
            assert_eq!(delta.text(), "still here");
            (Instant::now(), size)
        }
    };
    let latency = arrived.saturating_duration_since(posted_at);
    eprintln!("chat during the download: {latency:?} after the post (at byte {at_byte} of {size})");
    assert!(latency < Duration::from_millis(500), "a chat push waited {latency:?} behind file chunks");

    // And through the real CLI, with the hash check.
    let home = dir.path().join("home");
    let mut cmd = d.cli(&home);
    cmd.args(["login", &ann.name]);
    cli_ok(cmd);

    // `chime upload` killed mid-upload, then run again: it resumes the same upload (its id is
    // kept in the home dir until it is finished) and the server verifies the whole file.
    let second = random_file(dir.path(), "second.bin", size, 202);
    let second_sha = hex::encode(sha_of(&second));
    let uploads = d.data_dir().join("cache").join("uploads");
    let staged_bytes = || {
        fs::read_dir(&uploads)
            .map(|e| e.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).max().unwrap_or(0))
            .unwrap_or(0)
    };
    let mut cmd = d.cli(&home);
    cmd.args(["upload", &room.get().to_string(), second.to_str().expect("utf-8")]);
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("spawn chime upload");
    let deadline = Instant::now() + Duration::from_secs(60);
    while staged_bytes() < 10 << 20 {
        assert!(Instant::now() < deadline, "the upload never got going");
        assert!(matches!(child.try_wait(), Ok(None)), "the upload finished before it could be cut");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("kill chime");
    let _ = child.wait();
    let marker = home.join("uploads");
    assert_eq!(fs::read_dir(&marker).map(|e| e.count()).unwrap_or(0), 1, "the unfinished upload is remembered");
    let up = cli(&d, &home, &["upload", &room.get().to_string(), second.to_str().expect("utf-8")]);
    assert_eq!(json_str(&up[0], "sha256"), second_sha);
    assert_eq!(fs::read_dir(&marker).map(|e| e.count()).unwrap_or(0), 0, "and forgotten once finished");
    assert_eq!(fs::read_dir(&uploads).map(|e| e.count()).unwrap_or(0), 0, "no staged bytes are left behind");
    let out = dir.path().join("back.bin");
    let down = cli(&d, &home, &["download", &stored.file.to_string(), "-o", out.to_str().expect("utf-8")]);
    assert_eq!(json_str(&down[0], "sha256"), hex::encode(sha));
}
