//! Runs the built `chime` binary for what needs no daemon: usage errors, and failures that
//! must end with exit 1 and a single stderr line before any connection is made.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `chime` with a private home, no inherited Chime settings and a server nobody listens on.
fn chime(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chime"))
        .arg("--home")
        .arg(home)
        .args(["--server", "127.0.0.1:1"])
        .args(args)
        .env_remove("CHIME_SERVER")
        .env_remove("CHIME_HOME")
        .env_remove("CHIME_PASSWORD")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run chime")
}

fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr).lines().map(str::to_owned).collect()
}

#[test]
fn usage_errors_exit_2() {
    let home = tempfile::tempdir().expect("temp dir");
    for args in [
        &[][..],
        &["frobnicate"],
        &["send", "3"],
        &["send", "general", "hi"],
        &["history", "3", "--limit", "many"],
        &["tail"],
        &["room", "create"],
    ] {
        let output = chime(home.path(), args);
        assert_eq!(output.status.code(), Some(2), "chime {args:?}: {output:?}");
        assert!(output.stdout.is_empty(), "chime {args:?} printed on stdout");
    }
}

#[test]
fn help_and_version_succeed() {
    let home = tempfile::tempdir().expect("temp dir");
    let output = chime(home.path(), &["--help"]);
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for command in ["register", "login", "logout", "room", "rooms", "send", "history", "tail"] {
        assert!(help.contains(command), "help lacks {command}: {help}");
    }
    let output = chime(home.path(), &["--version"]);
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn commands_needing_a_session_fail_with_one_line_when_logged_out() {
    let home = tempfile::tempdir().expect("temp dir");
    for args in [
        &["send", "3", "hello"][..],
        &["--json", "history", "3"],
        &["rooms"],
        &["members", "3"],
        &["room", "create", "general"],
        &["tail", "3"],
        &["logout"],
    ] {
        let output = chime(home.path(), args);
        assert_eq!(output.status.code(), Some(1), "chime {args:?}: {output:?}");
        assert!(output.stdout.is_empty(), "chime {args:?} printed on stdout");
        let lines = stderr_lines(&output);
        assert_eq!(lines.len(), 1, "chime {args:?}: {lines:?}");
        assert!(lines[0].starts_with("chime: not logged in"), "{lines:?}");
        assert!(lines[0].contains("chime login USER"), "{lines:?}");
    }
    // Nothing was written to the home directory by failing commands.
    assert_eq!(std::fs::read_dir(home.path()).expect("list").count(), 0);
}

#[test]
fn an_unreachable_server_is_one_line_naming_it() {
    let home = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_chime"))
        .arg("--home")
        .arg(home.path())
        .args(["--server", "127.0.0.1:1", "--plaintext", "--password-stdin", "login", "alice"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(b"s3cret\n")?;
            child.wait_with_output()
        })
        .expect("run chime");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("chime: ") && lines[0].contains("127.0.0.1:1"), "{lines:?}");
    assert!(!lines[0].contains("s3cret"), "{lines:?}");
}

#[test]
fn a_corrupt_known_hosts_is_refused_not_re_pinned() {
    let home = tempfile::tempdir().expect("temp dir");
    std::fs::write(home.path().join("sessions.json"), r#"{"127.0.0.1:1":{"token":"t","user":"a","user_id":1}}"#)
        .expect("write sessions");
    std::fs::write(home.path().join("known_hosts"), "127.0.0.1:1 not-a-fingerprint\n").expect("write known_hosts");
    let output = chime(home.path(), &["rooms"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("known_hosts line 1"), "{lines:?}");
}
