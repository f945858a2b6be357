//! The command line: global flags and the command table of `docs`' outside interface.
//!
//! Only parsing lives here; [`crate::commands`] and [`crate::tail`] carry the commands out. clap
//! exits with status 2 on a usage error, which is the interface's usage-error code.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// `chime`: the Chime terminal client.
#[derive(Debug, Parser)]
#[command(name = "chime", version, about = "The Chime terminal client.")]
pub struct Cli {
    /// Flags every command accepts.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command accepts, before or after the command name.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// The server to talk to.
    #[arg(long, global = true, env = "CHIME_SERVER", default_value = "127.0.0.1:7878", value_name = "HOST:PORT")]
    pub server: String,
    /// Where the session token and pinned server fingerprints live [default: ~/.config/chime].
    #[arg(long, global = true, env = "CHIME_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Talk to a plaintext listener instead of TLS.
    #[arg(long, global = true)]
    pub plaintext: bool,
    /// Machine output: one JSON object per line on stdout, nothing else.
    #[arg(long, global = true)]
    pub json: bool,
    /// Read the password from the first line of stdin (else env CHIME_PASSWORD, else a prompt).
    #[arg(long, global = true)]
    pub password_stdin: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an account and log in.
    Register {
        /// The new user name.
        user: String,
    },
    /// Log in and store the session token.
    Login {
        /// The user name.
        user: String,
    },
    /// Revoke the stored session token and forget it.
    Logout,
    /// Show who you are logged in as.
    Whoami,
    /// Create, join or leave a room.
    Room {
        /// What to do with the room.
        #[command(subcommand)]
        command: RoomCommand,
    },
    /// Open the direct dialog with a user (created on first use, one per pair); prints its room.
    Dm {
        /// The other user's name.
        user: String,
    },
    /// List the rooms you are in.
    Rooms,
    /// List a room's members.
    Members {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
    },
    /// Post a message; returns once the server has written it durably.
    Send {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The message; several words are joined with spaces (use `--` before text that starts
        /// with `-`).
        #[arg(required = true, value_name = "TEXT")]
        text: Vec<String>,
    },
    /// Edit one of your messages (a new EDIT delta; the original stays in the log).
    Edit {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The message's seq.
        seq: u64,
        /// The new text; several words are joined with spaces.
        #[arg(required = true, value_name = "TEXT")]
        text: Vec<String>,
    },
    /// Delete a message (yours, or anyone's if your role allows).
    Delete {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The message's seq.
        seq: u64,
    },
    /// React to a message with an emoji, or take the reaction back.
    React {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The message's seq.
        seq: u64,
        /// The emoji.
        emoji: String,
        /// Take the reaction back.
        #[arg(long)]
        remove: bool,
    },
    /// Answer a message.
    Reply {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The seq of the message answered.
        seq: u64,
        /// The reply; several words are joined with spaces.
        #[arg(required = true, value_name = "TEXT")]
        text: Vec<String>,
    },
    /// Pin a message to the room, or unpin it.
    Pin {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The message's seq.
        seq: u64,
        /// Unpin instead.
        #[arg(long)]
        remove: bool,
    },
    /// Show the newest messages in their current state (edits applied, deletes shown, reactions
    /// counted), oldest first.
    View {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// How many messages.
        #[arg(long, default_value_t = 50, value_name = "N")]
        limit: u64,
    },
    /// Print a room's whole log, every delta once, oldest first (or newest first), waiting
    /// whenever the server's restore rate limit asks to.
    Restore {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// From the newest delta down instead of from the first up.
        #[arg(long)]
        newest_first: bool,
        /// Deltas per page [default: the largest the server allows].
        #[arg(long, value_name = "N")]
        page: Option<u32>,
    },
    /// Find the messages that contain every word of QUERY (as they read now: edits applied,
    /// deleted ones never), newest first.
    Search {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The words to look for; several are joined with spaces. Case does not matter; there is
        /// no search syntax.
        #[arg(required = true, value_name = "QUERY")]
        query: Vec<String>,
        /// How many messages at most.
        #[arg(long, default_value_t = 50, value_name = "N")]
        limit: u64,
    },
    /// Print a room's deltas, oldest first.
    History {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// Start after this seq.
        #[arg(long, default_value_t = 0, value_name = "SEQ")]
        after: u64,
        /// Print at most this many deltas [default: all].
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Follow rooms live until killed, reconnecting and catching up after any disconnect.
    Tail {
        /// The room ids.
        #[arg(required = true, value_parser = parse_room, value_name = "ROOM")]
        rooms: Vec<u64>,
        /// Catch up from this seq first [default: only deltas newer than the current head].
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
    },
    /// Measure the round trip to the server.
    Ping,
    /// List your sessions (the devices logged in to your account), or revoke them.
    Sessions {
        /// Without one, list the sessions.
        #[command(subcommand)]
        command: Option<SessionsCommand>,
    },
}

/// `sessions` subcommands.
#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Revoke one session by id (its connections end at once), or all of them with --all (this
    /// one included: you are logged out here too).
    Revoke {
        /// The session id, as `chime sessions` prints it.
        #[arg(required_unless_present = "all", conflicts_with = "all", value_name = "ID")]
        id: Option<u64>,
        /// Revoke every session of the account.
        #[arg(long)]
        all: bool,
    },
}

/// `room` subcommands.
#[derive(Debug, Subcommand)]
pub enum RoomCommand {
    /// Create a group room; you become its owner.
    Create {
        /// The room's name.
        name: String,
    },
    /// Join a room.
    Join {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
    },
    /// Leave a room.
    Leave {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
    },
    /// Show a room's name, kind, latest seq, member count and your role.
    Info {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
    },
}

/// Parses a room id, accepting the `#3` spelling the human output uses as well as `3`.
fn parse_room(s: &str) -> Result<u64, String> {
    let digits = s.strip_prefix('#').unwrap_or(s);
    digits.parse::<u64>().map_err(|_| format!("`{s}` is not a room id (a number such as 3)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn room_ids_accept_a_hash_prefix() {
        assert_eq!(parse_room("#12"), Ok(12));
        assert_eq!(parse_room("7"), Ok(7));
        assert!(parse_room("general").is_err());
        assert!(parse_room("-1").is_err());
    }

    #[test]
    fn send_joins_words_and_global_flags_go_anywhere() {
        let cli = Cli::try_parse_from(["chime", "send", "3", "hello", "world", "--json"]).expect("valid command line");
        assert!(cli.global.json);
        match cli.command {
            Command::Send { room, text } => {
                assert_eq!(room, 3);
                assert_eq!(text, ["hello", "world"]);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn sessions_revoke_takes_an_id_or_all() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied()).map(|c| c.command);
        assert!(matches!(parse(&["chime", "sessions"]), Ok(Command::Sessions { command: None })));
        assert!(matches!(
            parse(&["chime", "sessions", "revoke", "12"]),
            Ok(Command::Sessions { command: Some(SessionsCommand::Revoke { id: Some(12), all: false }) })
        ));
        assert!(matches!(
            parse(&["chime", "sessions", "revoke", "--all"]),
            Ok(Command::Sessions { command: Some(SessionsCommand::Revoke { id: None, all: true }) })
        ));
        assert!(parse(&["chime", "sessions", "revoke"]).is_err(), "an id or --all is required");
        assert!(parse(&["chime", "sessions", "revoke", "3", "--all"]).is_err(), "not both");
    }

    #[test]
    fn restore_and_search_parse() {
        let cli = Cli::try_parse_from(["chime", "restore", "#4", "--newest-first", "--json"]).expect("valid");
        assert!(matches!(cli.command, Command::Restore { room: 4, newest_first: true, page: None }));
        let cli = Cli::try_parse_from(["chime", "search", "4", "hello", "world", "--limit", "3"]).expect("valid");
        match cli.command {
            Command::Search { room, query, limit } => {
                assert_eq!((room, query.join(" "), limit), (4, "hello world".into(), 3))
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["chime", "search", "4"]).is_err(), "a query is required");
    }

    #[test]
    fn tail_takes_several_rooms() {
        let cli = Cli::try_parse_from(["chime", "tail", "1", "#2", "--after", "5"]).expect("valid command line");
        match cli.command {
            Command::Tail { rooms, after } => {
                assert_eq!(rooms, [1, 2]);
                assert_eq!(after, Some(5));
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
