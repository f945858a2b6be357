//! The commands, one module per group, and the dispatch from the parsed command line.
//!
//! Each command opens its own connection through [`Ctx`], does one thing, prints its records and
//! returns. Failures come back as [`CallError`]s; [`run`] words them into the one line `main`
//! prints.

mod account;
mod files;
mod message;
mod room;
mod server;

use crate::cli::{ChannelCommand, Cli, Command, RoomCommand, ServerCommand, SessionsCommand};
use crate::connect::{home_from_flag, CallError, Ctx};
use crate::output::Output;
use crate::tail;
use chime_protocol::{ModAction, PresenceStatus};
use serde_json::json;

/// Carries out the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let home = home_from_flag(cli.global.home)?;
    let mut ctx = Ctx {
        server: cli.global.server,
        tls: !cli.global.plaintext,
        home,
        password_stdin: cli.global.password_stdin,
        out: Output::stdout(cli.global.json),
    };
    let result = match cli.command {
        Command::Register { user, email, display_name } => {
            account::register(&mut ctx, &user, email.as_deref(), display_name.as_deref())
        }
        Command::Login { user } => account::login(&mut ctx, &user),
        Command::Logout => account::logout(&mut ctx),
        Command::Whoami => account::whoami(&mut ctx),
        Command::Profile { user: Some(user), .. } => account::show_profile(&mut ctx, Some(&user)),
        Command::Profile { user: None, email, clear_email, display_name } => {
            // `--email ""` is the spelling of "no email" that scripts can pass as a variable.
            let email = if clear_email { Some(None) } else { email.map(|e| Some(e).filter(|e| !e.is_empty())) };
            match (email, display_name) {
                (None, None) => account::show_profile(&mut ctx, None),
                (email, display_name) => account::change_profile(&mut ctx, email, display_name.as_deref()),
            }
        }
        Command::Settings { key: Some(key), value: Some(value) } => account::set_setting(&mut ctx, &key, &value),
        Command::Settings { .. } => account::settings(&mut ctx),
        Command::Room { command } => match command {
            RoomCommand::Create { name, private, secret } => room::create(&mut ctx, &name, private, secret),
            RoomCommand::Invite { room, user } => room::moderate(&mut ctx, room, &user, ModAction::INVITE, ""),
            RoomCommand::Kick { room, user } => room::moderate(&mut ctx, room, &user, ModAction::KICK, ""),
            RoomCommand::Ban { room, user, remove } => {
                let action = if remove { ModAction::UNBAN } else { ModAction::BAN };
                room::moderate(&mut ctx, room, &user, action, "")
            }
            RoomCommand::Mute { room, user, remove } => {
                let action = if remove { ModAction::UNMUTE } else { ModAction::MUTE };
                room::moderate(&mut ctx, room, &user, action, "")
            }
            RoomCommand::Role { room, user, role } => room::moderate(&mut ctx, room, &user, ModAction::SET_ROLE, &role),
            RoomCommand::DefineRole { room, name, permissions, remove } => {
                room::define_role(&mut ctx, room, &name, if remove { None } else { Some(&permissions[..]) })
            }
            RoomCommand::Join { room } => room::join(&mut ctx, room),
            RoomCommand::Leave { room } => room::leave(&mut ctx, room),
            RoomCommand::Info { room } => room::info(&mut ctx, room),
        },
        Command::Dm { user } => room::direct(&mut ctx, &user),
        Command::Server { command } => match command {
            ServerCommand::Create { name, private, description } => {
                server::create(&mut ctx, &name, &description, !private)
            }
            ServerCommand::Join { server } => server::join(&mut ctx, server),
            ServerCommand::Leave { server } => server::leave(&mut ctx, server),
            ServerCommand::Role { server, user, role } => server::role(&mut ctx, server, &user, &role),
            ServerCommand::DefineRole { server, name, permissions, remove } => {
                server::define_role(&mut ctx, server, &name, if remove { None } else { Some(&permissions[..]) })
            }
            ServerCommand::Invite { server, user } => server::moderate(&mut ctx, server, &user, ModAction::INVITE),
            ServerCommand::Ban { server, user, remove } => {
                let action = if remove { ModAction::UNBAN } else { ModAction::BAN };
                server::moderate(&mut ctx, server, &user, action)
            }
        },
        Command::Servers => server::list(&mut ctx),
        Command::Channel { command: ChannelCommand::Create { server, name, voice, read_roles, post_roles } } => {
            server::create_channel(&mut ctx, server, &name, voice, read_roles, post_roles)
        }
        Command::Read { room, seq } => message::read(&mut ctx, room, seq),
        Command::Unread => message::unread(&mut ctx),
        Command::Notifications { limit } => message::notifications(&mut ctx, limit),
        Command::Presence { status } => ephemeral(&mut ctx, |c| {
            let status = if status == "away" { PresenceStatus::AWAY } else { PresenceStatus::ONLINE };
            c.set_presence(status)
        }),
        Command::Call { room, action, call, data } => message::call(&mut ctx, room, &action, call, &data),
        Command::Typing { room } => ephemeral(&mut ctx, |c| c.typing(chime_protocol::RoomId(room))),
        Command::Rooms => room::list(&mut ctx),
        Command::Members { room } => room::members(&mut ctx, room),
        Command::Send { room, text } => message::send(&mut ctx, room, &text),
        Command::Edit { room, seq, text } => message::edit(&mut ctx, room, seq, &text),
        Command::Delete { room, seq } => message::delete(&mut ctx, room, seq),
        Command::React { room, seq, emoji, remove } => message::react(&mut ctx, room, seq, &emoji, remove),
        Command::Reply { room, seq, text } => message::reply(&mut ctx, room, seq, &text),
        Command::Pin { room, seq, remove } => message::pin(&mut ctx, room, seq, remove),
        Command::View { room, limit } => message::view(&mut ctx, room, limit),
        Command::History { room, after, limit } => message::history(&mut ctx, room, after, limit),
        Command::Restore { room, newest_first, page } => message::restore(&mut ctx, room, newest_first, page),
        Command::Search { room, query, limit } => message::search(&mut ctx, room, &query, limit),
        Command::Tail { rooms, after } => tail::run(&mut ctx, &rooms, after),
        Command::Ping => ping(&mut ctx),
        Command::Upload { room, file, caption } => files::upload(&mut ctx, room, &file, &caption),
        Command::Download { file, output } => files::download(&mut ctx, file, output.as_deref()),
        Command::Forward { room, seq, to_room } => files::forward(&mut ctx, room, seq, to_room),
        Command::Sessions { command: None } => account::sessions(&mut ctx),
        Command::Sessions { command: Some(SessionsCommand::Revoke { id, all }) } => {
            account::revoke(&mut ctx, if all { None } else { id })
        }
    };
    result.map_err(|e| ctx.explain(e))
}

/// `presence` and `typing`: one ephemeral request; prints `{}`.
fn ephemeral(
    ctx: &mut Ctx,
    call: impl FnOnce(&mut chime_client::blocking::Client) -> Result<(), chime_client::blocking::ClientError>,
) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    call(&mut client)?;
    ctx.out.record(&json!({}), "done")?;
    Ok(())
}

/// `ping`: the round trip of one PING/PONG, without logging in.
fn ping(ctx: &mut Ctx) -> Result<(), CallError> {
    let mut client = ctx.connect()?;
    let rtt = client.ping()?;
    let welcome = client.welcome();
    let rtt_ms = rtt.as_secs_f64() * 1000.0;
    ctx.out.record(
        &json!({
            "server": ctx.server,
            "rtt_ms": (rtt_ms * 1000.0).round() / 1000.0,
            "server_name": welcome.server_name,
            "server_version": welcome.server_version,
        }),
        &format!("pong from {} ({} {}) in {rtt_ms:.3} ms", ctx.server, welcome.server_name, welcome.server_version),
    )?;
    Ok(())
}
