//! The `chimed` binary's start-up checks, run as a real process: configuration validation,
//! one-line errors, and `chimed migrate`. Nothing here starts the event loop.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Longest any of these invocations may take; none of them serves.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `chimed ARGS` in `cwd` with a clean database environment and waits for it, killing it
/// if it outlives [`TIMEOUT`] (so a regression that starts serving cannot hang the test run).
fn chimed(cwd: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chimed"))
        .args(args)
        .current_dir(cwd)
        .env_remove("CHIMED_DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chimed");
    let start = Instant::now();
    loop {
        match child.try_wait().expect("wait for chimed") {
            Some(_) => break,
            None if start.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let output = child.wait_with_output().expect("collect chimed output");
                panic!("chimed {args:?} did not exit within {TIMEOUT:?}: {output:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    child.wait_with_output().expect("collect chimed output")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A failure must be exactly one line, `chimed: REASON`.
fn assert_one_line_failure(output: &Output, mentions: &str) {
    assert!(!output.status.success(), "expected failure: {output:?}");
    let stderr = stderr_of(output);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr should be one line: {stderr:?}");
    assert!(lines[0].starts_with("chimed: "), "{stderr:?}");
    assert!(lines[0].contains(mentions), "expected {mentions:?} in {stderr:?}");
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("chimed.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:17878\"\nplaintext_listen = \"127.0.0.1:17879\"\n\
         data_dir = \"data\"\nworkers = 3\nheartbeat_secs = 10\n",
    )
    .expect("write config");
    for flag in ["--check-config", "-t"] {
        let output = chimed(dir.path(), &["--config", "chimed.toml", flag]);
        assert!(output.status.success(), "{output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout), "configuration ok\n");
        // Checking creates nothing: no data dir, no certificate.
        assert!(!dir.path().join("data").exists());
    }
    let output = chimed(dir.path(), &["serve", "--config", "chimed.toml", "--check-config"]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn unknown_key_is_a_one_line_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bad.toml"), "listen = \"127.0.0.1:7878\"\nlisten_port = 7878\n")
        .expect("write config");
    let output = chimed(dir.path(), &["--config", "bad.toml", "--check-config"]);
    assert_one_line_failure(&output, "bad.toml");
    assert!(stderr_of(&output).contains("listen_port"), "{output:?}");
    assert!(stderr_of(&output).contains("line 2"), "{output:?}");
}

#[test]
fn missing_config_file_is_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = chimed(dir.path(), &["--config", "nowhere.toml", "-t"]);
    assert_one_line_failure(&output, "nowhere.toml");
}

#[test]
fn public_plaintext_needs_the_explicit_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = chimed(dir.path(), &["--plaintext-listen", "0.0.0.0:17879", "--check-config"]);
    assert_one_line_failure(&output, "plaintext_listen");
    assert!(stderr_of(&output).contains("allow-public-plaintext"), "{output:?}");

    let output =
        chimed(dir.path(), &["--plaintext-listen", "0.0.0.0:17879", "--allow-public-plaintext", "--check-config"]);
    assert!(output.status.success(), "{output:?}");

    // The same rule applies to a value from the file; the flag still overrides the file.
    std::fs::write(dir.path().join("public.toml"), "plaintext_listen = \"0.0.0.0:17879\"\n").expect("write config");
    let output = chimed(dir.path(), &["--config", "public.toml", "-t"]);
    assert_one_line_failure(&output, "plaintext_listen");
    let output = chimed(dir.path(), &["--config", "public.toml", "--plaintext-listen", "127.0.0.1:17879", "-t"]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn out_of_range_values_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = chimed(dir.path(), &["--workers", "0", "-t"]);
    assert_one_line_failure(&output, "workers");
    let output = chimed(dir.path(), &["--listen", "localhost", "-t"]);
    assert_one_line_failure(&output, "listen");
    let output = chimed(dir.path(), &["--tls-cert", "cert.pem", "-t"]);
    assert_one_line_failure(&output, "tls_key");
    // Given certificate files are loaded by the check, so a missing one is reported.
    let output = chimed(dir.path(), &["--tls-cert", "cert.pem", "--tls-key", "key.pem", "-t"]);
    assert_one_line_failure(&output, "cert.pem");
}

#[test]
fn migrate_creates_the_embedded_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("x.db");
    let url = format!("sqlite:{}", db.display());
    let output = chimed(dir.path(), &["migrate", "--database", &url]);
    assert!(output.status.success(), "{output:?}");
    assert!(db.exists(), "{} was not created", db.display());
    // Migrations are idempotent: a second run finds nothing to do.
    let output = chimed(dir.path(), &["migrate", "--database", &url]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn migrate_defaults_to_the_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = chimed(dir.path(), &["migrate", "--data-dir", "state"]);
    assert!(output.status.success(), "{output:?}");
    assert!(dir.path().join("state/chime.db").exists());
}

#[test]
fn unreachable_database_is_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let output = chimed(dir.path(), &["migrate", "--database", "postgres://chime:secret@127.0.0.1:1/chime"]);
    assert_one_line_failure(&output, "cannot open database");
    assert!(!stderr_of(&output).contains("secret"), "password leaked: {output:?}");
}
