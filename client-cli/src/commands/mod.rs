//! The commands, one module per group, and the dispatch from the parsed command line.
//!
//! Each command opens its own connection through [`Ctx`], does one thing, prints its records and
//! returns. Failures come back as [`CallError`]s; [`run`] words them into the one line `main`
//! prints.

mod account;
mod message;
mod room;

use crate::cli::{Cli, Command, RoomCommand, SessionsCommand};
use crate::connect::{home_from_flag, CallError, Ctx};
use crate::output::Output;
use crate::tail;
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
        Command::Register { user } => account::register(&mut ctx, &user),
        Command::Login { user } => account::login(&mut ctx, &user),
        Command::Logout => account::logout(&mut ctx),
        Command::Whoami => account::whoami(&mut ctx),
        Command::Room { command } => match command {
            RoomCommand::Create { name } => room::create(&mut ctx, &name),
            RoomCommand::Join { room } => room::join(&mut ctx, room),
            RoomCommand::Leave { room } => room::leave(&mut ctx, room),
            RoomCommand::Info { room } => room::info(&mut ctx, room),
        },
        Command::Dm { user } => room::direct(&mut ctx, &user),
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
        Command::Sessions { command: None } => account::sessions(&mut ctx),
        Command::Sessions { command: Some(SessionsCommand::Revoke { id, all }) } => {
            account::revoke(&mut ctx, if all { None } else { id })
        }
    };
    result.map_err(|e| ctx.explain(e))
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
