//! RESTORE through the real daemon and the real `chime restore`: a room's whole log, every delta
//! exactly once and in order, from either end, across the log's partitions; the per-user rate
//! limit refuses with `RATE_LIMITED` and a stated wait, which the CLI waits out and completes.

use crate::util::*;
use chime_protocol::{ErrorCode, RestoreOrder, RoomId, Seq};
use chime_tests::daemon::{Backend, Daemon};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

on_both_stores!(restore_prints_every_delta_once_both_ways, the_restore_rate_limit_is_waited_out);

fn cli(d: &Daemon, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = d.cli(home);
    cmd.args(args);
    cli_ok(cmd)
}

fn seqs_of(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|v| json_u64(v, "seq")).collect()
}

/// A room of `messages` messages after its CREATE, posted by `client`; returns its head.
fn fill(client: &mut chime_client::blocking::Client, room: u64, messages: usize) -> u64 {
    let texts: Vec<String> = (1..=messages).map(|i| format!("message {i}")).collect();
    let seqs = post_pipelined(client, RoomId(room), &texts);
    seqs.into_iter().max().unwrap_or(1)
}

fn restore_prints_every_delta_once_both_ways(backend: Backend) {
    // Partitions of 700 deltas: 3,000 deltas make five, and pages of the largest size cross them.
    let Some(d) = Daemon::start_backend(backend, "restore_both_ways", &["--partition-size", "700"]) else { return };
    let mut ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);
    let room = json_u64(&cli(&d, home.path(), &["room", "create", "archive"])[0], "room");
    let r = room.to_string();
    let head = fill(&mut ann.client, room, 2_999);
    assert_eq!(head, 3_000);

    let oldest = cli(&d, home.path(), &["restore", &r]);
    assert_eq!(seqs_of(&oldest), (1..=head).collect::<Vec<_>>());
    for line in &oldest {
        assert_delta_shape(line, room);
    }
    assert_eq!(json_str(&oldest[0], "kind"), "create");
    assert_eq!(json_str(&oldest[2999], "text"), "message 2999");
    // The same objects `history` prints, one per line.
    let history = cli(&d, home.path(), &["history", &r]);
    assert_eq!(oldest, history);

    let newest = cli(&d, home.path(), &["restore", &r, "--newest-first"]);
    assert_eq!(seqs_of(&newest), (1..=head).rev().collect::<Vec<_>>());
    assert_eq!(newest.iter().rev().cloned().collect::<Vec<_>>(), oldest);
    // Pages that do not divide the partitions, either way.
    let odd = cli(&d, home.path(), &["restore", &r, "--page", "333"]);
    assert_eq!(seqs_of(&odd), (1..=head).collect::<Vec<_>>());
    let odd = cli(&d, home.path(), &["restore", &r, "--newest-first", "--page", "333"]);
    assert_eq!(seqs_of(&odd), (1..=head).rev().collect::<Vec<_>>());

    // On the wire: pages say where the next one starts and where the head was.
    let client = &mut ann.client;
    let page = client.restore(RoomId(room), RestoreOrder::NEWEST_FIRST, Seq::ZERO, 0).expect("restore");
    assert_eq!((page.head, page.deltas.len(), page.next), (Seq(head), 500, Some(Seq(2_501))));
    let page = client.restore(RoomId(room), RestoreOrder::OLDEST_FIRST, Seq(2_990), 1_000_000).expect("restore");
    assert_eq!((page.deltas.len(), page.next), (10, None));
    let code = server_code(
        "cursor past the head",
        client.restore(RoomId(room), RestoreOrder::OLDEST_FIRST, Seq(head + 1), 10),
    );
    assert_eq!(code, ErrorCode::CURSOR_AHEAD);
    let code = server_code("unknown order", client.restore(RoomId(room), RestoreOrder(7), Seq::ZERO, 10));
    assert_eq!(code, ErrorCode::INVALID_ARGUMENT);
    // Members only.
    let code = server_code("non-member", bob.client.restore(RoomId(room), RestoreOrder::OLDEST_FIRST, Seq::ZERO, 10));
    assert_eq!(code, ErrorCode::NOT_MEMBER);
}

fn the_restore_rate_limit_is_waited_out(backend: Backend) {
    let flags = ["--restore-pages-per-sec", "20", "--restore-burst", "3"];
    let Some(d) = Daemon::start_backend(backend, "restore_rate_limit", &flags) else { return };
    let mut ann = d.register(&unique("ann"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);
    let room = json_u64(&cli(&d, home.path(), &["room", "create", "slow"])[0], "room");
    let head = fill(&mut ann.client, room, 399);

    // The burst, then a refusal that says how long to wait, then (after that wait) a page again.
    for _ in 0..3 {
        ann.client.restore(RoomId(room), RestoreOrder::OLDEST_FIRST, Seq::ZERO, 10).expect("within the burst");
    }
    let refused = ann.client.restore(RoomId(room), RestoreOrder::OLDEST_FIRST, Seq::ZERO, 10);
    let Err(chime_client::ClientError::Server(e)) = refused else { panic!("expected RATE_LIMITED, got {refused:?}") };
    assert_eq!(e.code, ErrorCode::RATE_LIMITED);
    assert!(e.retryable, "{e:?}");
    let wait = e.retry_after_ms().unwrap_or_else(|| panic!("no wait stated: {e:?}"));
    assert!((1..=50).contains(&wait), "20 pages a second: at most 50 ms, stated {wait}");
    std::thread::sleep(Duration::from_millis(wait));
    ann.client.restore(RoomId(room), RestoreOrder::OLDEST_FIRST, Seq::ZERO, 10).expect("after the stated wait");

    // The CLI meets the limit (20 pages of 20 after a burst of 3) and waits it out.
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let mut cmd = d.cli(home.path());
    cmd.args(["restore", &room.to_string(), "--page", "20"]).env("RUST_LOG", "info");
    let (code, stdout, stderr) = cli_run(&mut cmd);
    let took = started.elapsed();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(seqs_of(&lines), (1..=head).collect::<Vec<_>>());
    assert!(stderr.contains("RESTORE pages per second"), "the waits are logged: {stderr}");
    assert!(took >= Duration::from_millis(700), "17 pages past the burst at 20 a second took only {took:?}");
}
