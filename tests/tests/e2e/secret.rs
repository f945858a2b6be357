//! Secret rooms through the real daemon and `chime room create --secret`: a deleted message's
//! text and its edit's are gone from every file of the data directory (and, on PostgreSQL, of the
//! whole cluster's data directory: heap, indexes, TOAST, pg_wal), while the same steps in a normal
//! room leave them on disk (the grep works, and delete there stays soft).

use crate::util::*;
use chime_tests::daemon::{Backend, Daemon, DaemonOptions};
use chime_tests::postgres::PgServer;
use rand::Rng;
use serde_json::Value;
use std::path::Path;

on_both_stores!(deleted_secret_text_is_gone_from_disk, secret_rooms_take_no_files_and_no_forwards);

fn cli(d: &Daemon, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = d.cli(home);
    cmd.args(args);
    cli_ok(cmd)
}

/// 64 random hex characters: found on disk only where this test put them.
fn marker() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How many times `needle` occurs in the files under `dir`, all of them, recursively.
fn occurrences(dir: &Path, needle: &[u8]) -> usize {
    let mut count = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            count += occurrences(&path, needle);
        } else if kind.is_file() {
            if let Ok(bytes) = std::fs::read(&path) {
                count += bytes.windows(needle.len()).filter(|w| *w == needle).count();
            }
        }
    }
    count
}

/// Posts `first`, edits it to `second` and deletes it, through the CLI; returns the message's seq.
fn post_edit_delete(d: &Daemon, home: &Path, room: &str, first: &str, second: &str) -> u64 {
    let seq = json_u64(&cli(d, home, &["send", room, first])[0], "seq");
    cli(d, home, &["edit", room, &seq.to_string(), second]);
    let view = cli(d, home, &["view", room]);
    let m = view.iter().find(|m| json_u64(m, "seq") == seq).expect("in view");
    assert_eq!((m["text"].as_str(), m["edited"].as_bool()), (Some(second), Some(true)), "{m}");
    cli(d, home, &["delete", room, &seq.to_string()]);
    seq
}

fn deleted_secret_text_is_gone_from_disk(backend: Backend) {
    // PostgreSQL: a cluster of this test's own, so it can be stopped (flushing everything to its
    // files) and searched whole.
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            if chime_tests::postgres::skip_requested() {
                return;
            }
            Some(PgServer::start().expect("a throwaway PostgreSQL"))
        }
    };
    let database = pg.as_ref().map(|pg| pg.create_database("secret"));
    let mut d = Daemon::start(DaemonOptions { database, ..DaemonOptions::default() });
    let ann = d.register(&unique("ann"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);

    let created = cli(&d, home.path(), &["room", "create", "vault", "--secret"]);
    assert_eq!(json_str(&created[0], "kind"), "secret");
    let secret = json_u64(&created[0], "room").to_string();
    assert_eq!(json_str(&cli(&d, home.path(), &["room", "info", &secret])[0], "kind"), "secret");
    let normal = json_u64(&cli(&d, home.path(), &["room", "create", "lobby"])[0], "room").to_string();

    let (gone1, gone2, kept1, kept2) = (marker(), marker(), marker(), marker());
    // A message that stays, to show that reading a secret room opens what it sealed.
    let stays = json_u64(&cli(&d, home.path(), &["send", &secret, "still here"])[0], "seq");
    let seq = post_edit_delete(&d, home.path(), &secret, &gone1, &gone2);
    post_edit_delete(&d, home.path(), &normal, &kept1, &kept2);

    // Secret: the message reads as deleted, its log entries as tombstones (no text at all).
    let view = cli(&d, home.path(), &["view", &secret]);
    let m = view.iter().find(|m| json_u64(m, "seq") == seq).expect("in view");
    assert_eq!((m["deleted"].as_bool(), m["text"].is_null()), (Some(true), true), "{m}");
    let kept = view.iter().find(|m| json_u64(m, "seq") == stays).expect("in view");
    assert_eq!(kept["text"], "still here");
    let history = cli(&d, home.path(), &["history", &secret]);
    let text = serde_json::to_string(&history).expect("json");
    assert!(!text.contains(&gone1) && !text.contains(&gone2), "{text}");
    assert!(text.contains("still here"));
    assert!(history.iter().any(|h| h["kind"] == "delete"), "the tombstone delta: {text}");
    assert!(cli(&d, home.path(), &["search", &secret, "still"]).is_empty(), "secret rooms are never indexed");
    // Normal: delete stays soft, the log keeps both texts.
    let history = serde_json::to_string(&cli(&d, home.path(), &["history", &normal])).expect("json");
    assert!(history.contains(&kept1) && history.contains(&kept2), "{history}");

    // Everything to disk: the daemon stops (SQLite checkpoints as it may), PostgreSQL shuts down
    // (a checkpoint writes every dirty page to its files).
    d.stop();
    if let Some(pg) = &pg {
        pg.stop_fast().expect("stop PostgreSQL");
    }
    let mut dirs = vec![d.data_dir().to_path_buf()];
    dirs.extend(pg.as_ref().map(PgServer::data_dir));
    let count = |m: &str| dirs.iter().map(|dir| occurrences(dir, m.as_bytes())).sum::<usize>();
    let (g1, g2, k1, k2) = (count(&gone1), count(&gone2), count(&kept1), count(&kept2));
    eprintln!("{}: on disk after delete: secret room {g1} + {g2}, normal room {k1} + {k2}", backend.name());
    assert!(k1 > 0 && k2 > 0, "the normal room's text is on disk, so the search works ({k1}, {k2})");
    assert_eq!((g1, g2), (0, 0), "the secret room's deleted text is on disk");
}

/// A secret room's delete could not destroy a file's bytes (they live in the shared content
/// store) nor a forwarded copy of its text, so both are refused there, before any byte moves.
fn secret_rooms_take_no_files_and_no_forwards(backend: Backend) {
    let Some(database) = backend.fresh_database("secret_files") else { return };
    let d = Daemon::start(DaemonOptions { database, ..DaemonOptions::default() });
    let mut ann = d.register("ann");
    let secret = ann.client.create_room_of("shh", chime_protocol::RoomKind::SECRET).expect("secret").room;
    let open = ann.client.create_room("open").expect("open").room;
    let upload = ann.client.upload_begin(secret, "a.txt", 5, "text/plain", [1; 32]);
    assert_eq!(server_code("upload into a secret room", upload), chime_protocol::ErrorCode::FORBIDDEN);
    let key = chime_client::new_idempotency_key();
    let in_secret = ann.client.post(secret, &key, "between us").expect("post").seq;
    let key = chime_client::new_idempotency_key();
    let in_open = ann.client.post(open, &key, "for all").expect("post").seq;
    let out = ann.client.forward(secret, in_secret, open);
    assert_eq!(server_code("forward out of a secret room", out), chime_protocol::ErrorCode::FORBIDDEN);
    let into = ann.client.forward(open, in_open, secret);
    assert_eq!(server_code("forward into a secret room", into), chime_protocol::ErrorCode::FORBIDDEN);
    // Between ordinary rooms, forward works.
    let other = ann.client.create_room("other").expect("other").room;
    ann.client.forward(open, in_open, other).expect("forward between open rooms");
}
