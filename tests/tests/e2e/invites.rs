//! Private servers, invitations and server bans through the real daemon and `chime server
//! create --private|invite|ban|join`: a private server is joined only by invitation, given by a
//! member whose role may invite; a public one by id; a banned user joins neither until unbanned,
//! and a banned member's connections stop receiving the server's channels. A channel restricted
//! to some roles reaches its online readers live when it is created, and nobody else.

use crate::util::*;
use chime_protocol::{ErrorCode, ModAction, RoomId, ServerId};
use chime_tests::daemon::{Backend, Daemon};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

on_both_stores!(private_servers_are_joined_by_invitation_and_bans_hold);
on_both_stores!(restricted_channels_reach_their_online_readers_live);

fn cli(d: &Daemon, home: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = d.cli(home);
    cmd.args(args);
    cli_ok(cmd)
}

fn private_servers_are_joined_by_invitation_and_bans_hold(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "invites", &[]) else { return };
    let ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let mut cy = d.register(&unique("cy"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);
    let made = cli(&d, home.path(), &["server", "create", "club", "--private"]);
    let server = json_u64(&made[0], "server");
    assert_eq!(made[0]["public"], false);
    let general = json_u64(&made[0]["channels"][0], "room");

    // Private: not by id.
    let refused = server_code("join a private server", bob.client.join_server(ServerId(server)));
    assert_eq!(refused, ErrorCode::FORBIDDEN);
    // Invited by the owner (the CLI), bob joins; a plain member may not invite (member lacks invite).
    let invited = cli(&d, home.path(), &["server", "invite", &server.to_string(), &bob.name]);
    assert_eq!((json_str(&invited[0], "user"), json_str(&invited[0], "action")), (bob.name.as_str(), "invite"));
    let joined = bob.client.join_server(ServerId(server)).expect("join by invitation");
    assert_eq!((joined.members, joined.role.as_str()), (2, "member"));
    let by_member = bob.client.moderate_server(ServerId(server), &cy.name, ModAction::INVITE);
    assert_eq!(server_code("a member invites", by_member), ErrorCode::FORBIDDEN);
    assert_eq!(server_code("cy uninvited", cy.client.join_server(ServerId(server))), ErrorCode::FORBIDDEN);
    // An invitation is used up: bob leaves and cannot come back without a new one.
    bob.client.leave_server(ServerId(server)).expect("leave");
    assert_eq!(server_code("rejoin", bob.client.join_server(ServerId(server))), ErrorCode::FORBIDDEN);
    cli(&d, home.path(), &["server", "invite", &server.to_string(), &bob.name]);
    bob.client.join_server(ServerId(server)).expect("join again by a new invitation");

    // A ban removes bob (his connection stops receiving the channel) and holds against an invite.
    cli(&d, home.path(), &["send", &general.to_string(), "before"]);
    assert_eq!(next_delta(&mut bob.client, general, Duration::from_secs(5)).text(), "before");
    let banned = cli(&d, home.path(), &["server", "ban", &server.to_string(), &bob.name]);
    assert_eq!(json_str(&banned[0], "action"), "ban");
    assert_eq!(server_code("post after a ban", bob.client.post(RoomId(general), "b", "?")), ErrorCode::NOT_MEMBER);
    let mut invite = d.cli(home.path());
    invite.args(["server", "invite", &server.to_string(), &bob.name]);
    let (code, _, err) = cli_run(&mut invite);
    assert_eq!(code, Some(1), "inviting a banned user: {err}");
    assert_eq!(server_code("banned join", bob.client.join_server(ServerId(server))), ErrorCode::FORBIDDEN);

    // Public servers: joinable by id, but not by the banned.
    let public = json_u64(&cli(&d, home.path(), &["server", "create", "plaza"])[0], "server");
    cli(&d, home.path(), &["server", "ban", &public.to_string(), &cy.name]);
    assert_eq!(server_code("banned from a public one", cy.client.join_server(ServerId(public))), ErrorCode::FORBIDDEN);
    bob.client.join_server(ServerId(public)).expect("a public server by id");
    cli(&d, home.path(), &["server", "ban", &public.to_string(), &cy.name, "--remove"]);
    cy.client.join_server(ServerId(public)).expect("unbanned");
    // Unbanned from the private one, bob still needs an invitation.
    cli(&d, home.path(), &["server", "ban", &server.to_string(), &bob.name, "--remove"]);
    assert_eq!(server_code("unbanned, uninvited", bob.client.join_server(ServerId(server))), ErrorCode::FORBIDDEN);
}

fn restricted_channels_reach_their_online_readers_live(backend: Backend) {
    let Some(d) = Daemon::start_backend(backend, "restricted", &[]) else { return };
    let ann = d.register(&unique("ann"));
    let mut bob = d.register(&unique("bob"));
    let mut cy = d.register(&unique("cy"));
    let home = tempfile::tempdir().expect("home");
    cli(&d, home.path(), &["login", &ann.name]);
    let server = json_u64(&cli(&d, home.path(), &["server", "create", "guild"])[0], "server");
    bob.client.join_server(ServerId(server)).expect("bob joins");
    cy.client.join_server(ServerId(server)).expect("cy joins");
    cli(&d, home.path(), &["server", "role", &server.to_string(), &bob.name, "moderator"]);
    // Created while bob and cy are online: bob (a moderator) gets it live, cy (a member) does not.
    let staff = cli(&d, home.path(), &["channel", "create", &server.to_string(), "staff", "--read-roles", "moderator"]);
    let staff = json_u64(&staff[0], "room");
    cli(&d, home.path(), &["send", &staff.to_string(), "for moderators"]);
    let mut texts = Vec::new();
    while texts.len() < 2 {
        let delta = next_delta(&mut bob.client, staff, Duration::from_secs(5));
        texts.push((delta.seq.get(), delta.text().to_string()));
    }
    assert_eq!(texts[1], (2, "for moderators".to_string()), "{texts:?}");
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match cy.client.recv(Some(left)) {
            Ok(Some((0, chime_protocol::ServerFrame::Delta(d)))) => {
                assert_ne!(d.room, RoomId(staff), "cy is not a reader: {d:?}")
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("cy's connection: {e:?}"),
        }
    }
    assert_eq!(server_code("cy posts", cy.client.post(RoomId(staff), "c", "?")), ErrorCode::NOT_MEMBER);

    // Roles change while both are online: cy, made moderator, follows the channel at once (from
    // its start); bob, made member again, stops receiving it.
    cli(&d, home.path(), &["server", "role", &server.to_string(), &cy.name, "moderator"]);
    cli(&d, home.path(), &["server", "role", &server.to_string(), &bob.name, "member"]);
    cli(&d, home.path(), &["send", &staff.to_string(), "after the change"]);
    let mut seen = Vec::new();
    while seen.last() != Some(&3) {
        seen.push(next_delta(&mut cy.client, staff, Duration::from_secs(5)).seq.get());
    }
    assert_eq!(seen, [1, 2, 3], "cy catches up on the channel, then follows it");
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match bob.client.recv(Some(left)) {
            Ok(Some((0, chime_protocol::ServerFrame::Delta(d)))) => {
                assert!(!(d.room == RoomId(staff) && d.seq.get() == 3), "bob is no reader any more: {d:?}")
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("bob's connection: {e:?}"),
        }
    }
}
