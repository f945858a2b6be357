//! (k) `chime` over TLS pins the server's fingerprint on first use, and refuses (exit 1) when the
//! pinned fingerprint no longer matches.

use crate::util::*;
use chime_client::blocking::{Client, ConnectOptions};
use chime_client::fingerprint_hex;
use chime_tests::daemon::{Backend, Daemon};

on_both_stores!(tls_pins_on_first_use);

fn tls_pins_on_first_use(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "tls", &[]) else { return };
    let probe = Client::connect(&ConnectOptions::new(d.tls_addr().to_string(), true)).expect("TLS connect");
    let fp = fingerprint_hex(&probe.server_fingerprint().expect("a TLS fingerprint"));
    let home = tempfile::tempdir().expect("tempdir");
    let user = unique("tls");
    let mut cmd = d.cli_tls(home.path());
    cmd.args(["register", &user]);
    let out = cli_ok(cmd);
    assert_eq!(json_str(&out[0], "user"), user);

    let known_hosts = home.path().join("known_hosts");
    let pinned = std::fs::read_to_string(&known_hosts).expect("known_hosts written on first use");
    assert!(pinned.to_ascii_lowercase().contains(&fp), "known_hosts {pinned:?} does not pin {fp}");

    // Same certificate: fine.
    let mut cmd = d.cli_tls(home.path());
    cmd.arg("rooms");
    cli_ok(cmd);

    // Tampered pin: refused with exit 1 and a reason on stderr.
    let flipped: String = fp.chars().map(|c| if c == '0' { '1' } else { '0' }).collect();
    let tampered = pinned.to_ascii_lowercase().replace(&fp, &flipped);
    std::fs::write(&known_hosts, tampered).expect("write known_hosts");
    let mut cmd = d.cli_tls(home.path());
    cmd.arg("rooms");
    let (code, stdout, stderr) = cli_run(&mut cmd);
    assert_eq!(code, Some(1), "a fingerprint mismatch must exit 1; stdout {stdout:?} stderr {stderr:?}");
    assert!(!stderr.trim().is_empty(), "no reason given on stderr");
    assert!(stdout.trim().is_empty(), "printed output despite the mismatch: {stdout:?}");
}
