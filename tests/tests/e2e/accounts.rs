//! Accounts through the real daemon and the real `chime`: profiles (email unique whatever its
//! case, display names, another user's public profile), and settings that the server keeps and
//! syncs: a change on one connection is pushed to the user's other connections and is what a
//! later login reads.

use crate::util::*;
use chime_client::blocking::Client;
use chime_protocol::{ErrorCode, ServerFrame, SettingChanged};
use chime_tests::daemon::{Backend, Daemon, PASSWORD};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

on_both_stores!(
    profiles_are_shown_and_changed_with_chime_profile,
    an_email_belongs_to_one_account_whatever_its_case,
    settings_reach_every_device_and_the_next_login,
);

/// Runs `chime ARGS` in `home` and returns its one JSON record.
fn chime_one(d: &Daemon, home: &Path, args: &[&str]) -> Value {
    let mut cmd = d.cli(home);
    cmd.args(args);
    let mut out = cli_ok(cmd);
    assert_eq!(out.len(), 1, "chime {args:?} printed {out:?}");
    out.remove(0)
}

/// Runs `chime ARGS` in `home`, expects exit status 1, and returns its stdout and stderr.
fn chime_fails(d: &Daemon, home: &Path, args: &[&str]) -> (String, String) {
    let mut cmd = d.cli(home);
    cmd.args(args);
    let (code, stdout, stderr) = cli_run(&mut cmd);
    assert_eq!(code, Some(1), "chime {args:?} should fail: stdout {stdout} stderr {stderr}");
    (stdout, stderr)
}

/// Asserts a profile record has exactly the keys of interface.md (plus `user_id`) and returns
/// its email.
fn own_profile(v: &Value, user: &str, display_name: &str) -> Option<String> {
    let keys: Vec<&str> = v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, ["display_name", "email", "user", "user_id"], "{v}");
    assert_eq!(json_str(v, "user"), user, "{v}");
    assert_eq!(json_str(v, "display_name"), display_name, "{v}");
    json_u64(v, "user_id");
    match &v["email"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("{v}: email is {other}"),
    }
}

fn profiles_are_shown_and_changed_with_chime_profile(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "profiles", &[]) else { return };
    let home = tempfile::tempdir().expect("home");
    let ann = unique("ann");
    let registered =
        chime_one(&d, home.path(), &["register", &ann, "--email", "Ann@Example.org", "--display-name", "Ann L."]);
    assert_eq!(own_profile(&registered, &ann, "Ann L.").as_deref(), Some("Ann@Example.org"));

    let shown = chime_one(&d, home.path(), &["profile"]);
    assert_eq!(shown, registered, "profile shows what register set");
    // Trimmed; the email stays as it was.
    let renamed = chime_one(&d, home.path(), &["profile", "--display-name", "  Ann Lee  "]);
    assert_eq!(own_profile(&renamed, &ann, "Ann Lee").as_deref(), Some("Ann@Example.org"));
    let cleared = chime_one(&d, home.path(), &["profile", "--email", ""]);
    assert_eq!(own_profile(&cleared, &ann, "Ann Lee"), None);
    let again = chime_one(&d, home.path(), &["profile", "--email", "ann@example.org"]);
    assert_eq!(own_profile(&again, &ann, "Ann Lee").as_deref(), Some("ann@example.org"));
    let cleared = chime_one(&d, home.path(), &["profile", "--clear-email"]);
    assert_eq!(own_profile(&cleared, &ann, "Ann Lee"), None);

    // Another user's profile: the display name (the user name when none was chosen), never the
    // email, which has no key at all.
    let mut bob = d.register("bob");
    bob.client.update_profile(Some(Some("bob@example.org")), None).expect("bob's email");
    let theirs = chime_one(&d, home.path(), &["profile", &bob.name]);
    assert_eq!(json_str(&theirs, "display_name"), bob.name, "{theirs}");
    assert_eq!(json_u64(&theirs, "user_id"), bob.user_id, "{theirs}");
    assert!(theirs.get("email").is_none(), "{theirs}");
    let seen_by_bob = bob.client.profile(Some(&ann)).expect("ann's profile");
    assert_eq!((seen_by_bob.display_name.as_str(), seen_by_bob.email), ("Ann Lee", None));
    let own = bob.client.profile(Some(&bob.name)).expect("naming oneself");
    assert_eq!(own.email.as_deref(), Some("bob@example.org"));
    let (_, stderr) = chime_fails(&d, home.path(), &["profile", "nobody-by-that-name"]);
    assert!(stderr.contains("NOT_FOUND"), "{stderr}");

    // Refused values change nothing and say why.
    for (args, why) in [
        (&["profile", "--email", "ann.example.org"][..], "exactly one @"),
        (&["profile", "--email", "ann @example.org"][..], "spaces"),
        (&["profile", "--display-name", "   "][..], "empty"),
        (&["profile", "--display-name", "evil\u{202e}gnp.exe"][..], "does not show"),
    ] {
        let (_, stderr) = chime_fails(&d, home.path(), args);
        assert!(stderr.contains("INVALID_ARGUMENT") && stderr.contains(why), "{args:?}: {stderr}");
    }
    let long = "n".repeat(65);
    let (_, stderr) = chime_fails(&d, home.path(), &["profile", "--display-name", &long]);
    assert!(stderr.contains("at most 64"), "{stderr}");
    assert_eq!(chime_one(&d, home.path(), &["profile"]), cleared);

    // A joiner is allowed (emoji sequences need it), and the human output shows it escaped
    // between letters, as it does every user-chosen text; --json keeps it exact.
    let joined = chime_one(&d, home.path(), &["profile", "--display-name", "two\u{200d}words"]);
    assert_eq!(json_str(&joined, "display_name"), "two\u{200d}words");
    let mut human = Command::new(chime_tests::daemon::binary("chime"));
    human.args(["--server", &d.plaintext_addr().to_string(), "--plaintext", "--home"]).arg(home.path()).arg("profile");
    let (code, stdout, stderr) = cli_run(&mut human);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.trim_end(),
        format!("{ann} (user {}): display name \"two\\u{{200d}}words\", no email", json_u64(&joined, "user_id"))
    );
}

fn an_email_belongs_to_one_account_whatever_its_case(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "email_taken", &[]) else { return };
    let (home_a, home_b, home_c) =
        (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"), tempfile::tempdir().expect("c"));
    let (a, b) = (unique("a"), unique("b"));
    chime_one(&d, home_a.path(), &["register", &a, "--email", "Same@Example.org"]);
    chime_one(&d, home_b.path(), &["register", &b]);

    let (_, stderr) = chime_fails(&d, home_b.path(), &["profile", "--email", "same@example.ORG"]);
    assert!(stderr.contains("EMAIL_TAKEN") && stderr.contains("same@example.ORG"), "{stderr}");
    let b_now = chime_one(&d, home_b.path(), &["profile"]);
    assert_eq!(own_profile(&b_now, &b, &b), None, "the refused update wrote nothing");

    // Registering with a taken email: the account is created and logged in, the email refused.
    let c = unique("c");
    let (stdout, stderr) =
        chime_fails(&d, home_c.path(), &["register", &c, "--email", "SAME@example.org", "--display-name", "Cy"]);
    assert!(stderr.contains("EMAIL_TAKEN") && stderr.contains("chime profile"), "{stderr}");
    let printed: Value = serde_json::from_str(stdout.trim()).expect("the user record");
    assert_eq!(json_str(&printed, "user"), c);
    let c_now = chime_one(&d, home_c.path(), &["profile"]);
    assert_eq!(own_profile(&c_now, &c, &c), None, "neither field was set");

    // Once its owner lets go of it, anyone may take it.
    chime_one(&d, home_a.path(), &["profile", "--clear-email"]);
    let b_now = chime_one(&d, home_b.path(), &["profile", "--email", "same@example.ORG"]);
    assert_eq!(own_profile(&b_now, &b, &b).as_deref(), Some("same@example.ORG"));
    let mut raw = d.client();
    raw.login(&a, PASSWORD, "t").expect("login");
    let code = server_code("taking it back", raw.update_profile(Some(Some("same@EXAMPLE.org")), None));
    assert_eq!(code, ErrorCode::EMAIL_TAKEN);
}

/// The next `SETTING_CHANGED` push on `client`, skipping deltas; panics after `timeout`.
fn next_setting_push(client: &mut Client, timeout: Duration) -> SettingChanged {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no SETTING_CHANGED within {timeout:?}");
        match client.recv(Some(left)) {
            Ok(Some((0, ServerFrame::SettingChanged(c)))) => return c,
            Ok(Some((0, ServerFrame::Delta(_)))) | Ok(None) => {}
            other => panic!("waiting for SETTING_CHANGED: {other:?}"),
        }
    }
}

/// Asserts no `SETTING_CHANGED` arrives on `client` within `wait` (deltas are skipped).
fn no_setting_push(client: &mut Client, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match client.recv(Some(left)) {
            Ok(Some((0, ServerFrame::Delta(_)))) | Ok(None) => {}
            other => panic!("expected no push, got {other:?}"),
        }
    }
}

fn settings_reach_every_device_and_the_next_login(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "settings_sync", &[]) else { return };
    let mut phone = d.register("ann");
    let mut laptop = d.resume(&phone.token);
    let room = phone.client.create_room("lobby").expect("room").room;
    let theirs = d.user("bob").create_room("bob's").expect("room").room;
    let fresh = phone.client.settings().expect("settings");
    assert_eq!(fresh.version, 0);
    let pairs = |entries: &[chime_protocol::Setting]| {
        entries.iter().map(|s| (s.key.clone(), s.value.clone())).collect::<Vec<_>>()
    };
    let owned = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    assert_eq!(pairs(&fresh.entries), owned(&[("media.auto_load", "true"), ("media.low_quality_images", "false")]));

    // Set on the phone: answered there, pushed to the laptop, not echoed to the phone.
    let notify = format!("notify.{room}");
    let stored = phone.client.set_setting(&notify, "Mentions").expect("set");
    assert_eq!((stored.version, stored.key.as_str(), stored.value.as_str()), (1, notify.as_str(), "mentions"));
    assert_eq!(next_setting_push(&mut laptop, Duration::from_secs(5)), stored);
    no_setting_push(&mut phone.client, Duration::from_millis(300));

    // A device logging in later reads the current state, version included.
    let home = tempfile::tempdir().expect("home");
    chime_one(&d, home.path(), &["login", &phone.name]);
    let mut cmd = d.cli(home.path());
    cmd.arg("settings");
    let listed = cli_ok(cmd);
    for v in &listed {
        let keys: Vec<&String> = v.as_object().expect("an object").keys().collect();
        assert_eq!(keys.len(), 2, "{v}");
    }
    let listed: Vec<(String, String)> =
        listed.iter().map(|v| (json_str(v, "key").to_string(), json_str(v, "value").to_string())).collect();
    assert_eq!(
        listed,
        owned(&[("media.auto_load", "true"), ("media.low_quality_images", "false"), (&notify, "mentions")])
    );

    // Set from the CLI (a third connection): both live connections hear of it.
    let set = chime_one(&d, home.path(), &["settings", "media.auto_load", "false"]);
    assert_eq!((json_str(&set, "key"), json_str(&set, "value")), ("media.auto_load", "false"));
    let pushed = SettingChanged { version: 2, key: "media.auto_load".into(), value: "false".into() };
    assert_eq!(next_setting_push(&mut laptop, Duration::from_secs(5)), pushed);
    assert_eq!(next_setting_push(&mut phone.client, Duration::from_secs(5)), pushed);
    let set = chime_one(&d, home.path(), &["settings", &format!("notify.#{room}"), "none"]);
    assert_eq!((json_str(&set, "key"), json_str(&set, "value")), (notify.as_str(), "none"));
    assert_eq!(next_setting_push(&mut laptop, Duration::from_secs(5)).version, 3);

    let mut third = d.client();
    third.login(&phone.name, PASSWORD, "third device").expect("login");
    let now = third.settings().expect("settings");
    assert_eq!(now.version, 3);
    assert_eq!(
        pairs(&now.entries),
        owned(&[("media.auto_load", "false"), ("media.low_quality_images", "false"), (&notify, "none")])
    );

    // Refusals name what is allowed, change nothing and push nothing.
    for (args, code, why) in [
        (vec!["settings", "media.auto_load", "maybe"], "INVALID_ARGUMENT", "true or false"),
        (vec!["settings", "media.autoload", "true"], "INVALID_ARGUMENT", "media.low_quality_images"),
        (vec!["settings", &notify, "some"], "INVALID_ARGUMENT", "all, mentions or none"),
        (vec!["settings", "notify.lobby", "none"], "INVALID_ARGUMENT", "room id"),
    ] {
        let (_, stderr) = chime_fails(&d, home.path(), &args);
        assert!(stderr.contains(code) && stderr.contains(why), "{args:?}: {stderr}");
    }
    let not_mine = format!("notify.{theirs}");
    let (_, stderr) = chime_fails(&d, home.path(), &["settings", &not_mine, "none"]);
    assert!(stderr.contains("NOT_MEMBER"), "{stderr}");
    let code =
        server_code("a room that does not exist", third.set_setting(&format!("notify.{}", theirs.get() + 1000), "all"));
    assert_eq!(code, ErrorCode::NOT_MEMBER);
    no_setting_push(&mut laptop, Duration::from_millis(300));
    assert_eq!(third.settings().expect("settings").version, 3);

    // Leaving a room drops its level from the settings.
    phone.client.leave_room(room).expect("leave");
    let after = third.settings().expect("settings");
    assert_eq!(pairs(&after.entries), owned(&[("media.auto_load", "false"), ("media.low_quality_images", "false")]));
}
