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
    /// Create an account and log in; optionally set its email and display name right after.
    Register {
        /// The new user name.
        user: String,
        /// The account's email address (unique; used by no one else, whatever its case).
        #[arg(long, value_name = "EMAIL")]
        email: Option<String>,
        /// The name shown for you [default: the user name].
        #[arg(long, value_name = "NAME")]
        display_name: Option<String>,
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
    /// Show your profile (or another user's public one), or change your email and display name.
    Profile {
        /// Another user whose display name to show (their email is never shown).
        #[arg(conflicts_with_all = ["email", "clear_email", "display_name"], value_name = "USER")]
        user: Option<String>,
        /// Set your email address (`--email ""` removes it).
        #[arg(long, value_name = "EMAIL")]
        email: Option<String>,
        /// Remove your email address.
        #[arg(long, conflicts_with = "email")]
        clear_email: bool,
        /// Set the name shown for you (1 to 64 characters).
        #[arg(long, value_name = "NAME")]
        display_name: Option<String>,
    },
    /// List your settings, kept by the server for all your devices, or change one.
    ///
    /// Keys: media.auto_load and media.low_quality_images (true or false), notify.ROOM (all,
    /// mentions or none: which messages of room ROOM notify you).
    Settings {
        /// The setting to change.
        #[arg(requires = "value")]
        key: Option<String>,
        /// Its new value.
        value: Option<String>,
    },
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
    /// Create, join or leave a server (a community of channels).
    Server {
        /// What to do.
        #[command(subcommand)]
        command: ServerCommand,
    },
    /// List the servers you are in.
    Servers,
    /// Create a channel in a server.
    Channel {
        /// What to do.
        #[command(subcommand)]
        command: ChannelCommand,
    },
    /// Mark a room read up to SEQ (on every device).
    Read {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The last seq read.
        seq: u64,
    },
    /// Unread messages and mentions per room, as the server counts them.
    Unread,
    /// Messages that mention you (`@you`), newest first.
    Notifications {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Say you are online or away (to those who watch your presence).
    Presence {
        /// `online` or `away`.
        #[arg(value_parser = ["online", "away"])]
        status: String,
    },
    /// Call signalling in a room: start a call, join one, end or leave one (media is the
    /// clients' business; --data carries their offer or answer).
    Call {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// `invite`, `accept` or `end`.
        #[arg(value_parser = ["invite", "accept", "end"])]
        action: String,
        /// The call: the seq of its invite (for accept and end).
        #[arg(long, default_value_t = 0, value_name = "SEQ")]
        call: u64,
        /// Opaque signalling data for the other side.
        #[arg(long, default_value = "")]
        data: String,
    },
    /// Tell a room's online members you are typing.
    Typing {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
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
    /// Share a file in a room (resumes an unfinished upload of the same file; a progress bar on
    /// a terminal).
    Upload {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The file.
        file: PathBuf,
        /// Text shown with the file.
        #[arg(long, default_value = "")]
        caption: String,
    },
    /// Fetch a shared file and verify its hash (continues PATH.part if there is one).
    Download {
        /// The file id (from `upload`, or a file delta).
        file: u64,
        /// Where to save it (default: its name, in the current directory).
        #[arg(short = 'o', long = "output", value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Forward a message (and its file) to another room.
    Forward {
        /// The room the message is in.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The message's seq.
        seq: u64,
        /// The room to forward it to.
        #[arg(value_parser = parse_room)]
        to_room: u64,
    },
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
    /// Create a group room; you become its owner. Anyone may join it by id unless --private or --secret.
    Create {
        /// The room's name.
        name: String,
        /// Invite-only: members bring others in with `room invite`.
        #[arg(long)]
        private: bool,
        /// Secret (invite-only too): a deleted message's text is destroyed on the server's disk,
        /// not just hidden.
        #[arg(long, conflicts_with = "private")]
        secret: bool,
    },
    /// Make a user a member (the way into a private or secret room).
    Invite {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The user's name.
        user: String,
    },
    /// Remove a member (they may come back).
    Kick {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The user's name.
        user: String,
    },
    /// Remove a user and keep them out (--remove lifts the ban).
    Ban {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The user's name.
        user: String,
        /// Lift the ban instead.
        #[arg(long)]
        remove: bool,
    },
    /// Stop a member from posting (--remove lets them again).
    Mute {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The user's name.
        user: String,
        /// Unmute instead.
        #[arg(long)]
        remove: bool,
    },
    /// Give a member a role: owner, admin, moderator, member or one the room defined.
    Role {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The user's name.
        user: String,
        /// The role.
        role: String,
    },
    /// Define a role of the room (or redefine `member`, what every plain member may do) by its
    /// permissions: read post edit_own delete_own delete_any react pin invite kick ban mute
    /// manage_roles manage_channels upload.
    DefineRole {
        /// The room id.
        #[arg(value_parser = parse_room)]
        room: u64,
        /// The role's name.
        name: String,
        /// Its permissions.
        #[arg(required_unless_present = "remove", value_name = "PERMISSION")]
        permissions: Vec<String>,
        /// Remove the definition instead.
        #[arg(long, conflicts_with = "permissions")]
        remove: bool,
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

/// `server` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Create a server; you become its owner and it starts with a `general` channel.
    Create {
        /// Its name.
        name: String,
        /// Nobody can join it by id: members who may invite bring others in with `server invite`.
        #[arg(long)]
        private: bool,
        /// What it is about.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Join a public server, or a private one you were invited to: you can read its channels at once.
    Join {
        /// The server id.
        #[arg(id = "server_id", value_name = "SERVER")]
        server: u64,
    },
    /// Leave a server.
    Leave {
        /// The server id.
        #[arg(id = "server_id", value_name = "SERVER")]
        server: u64,
    },
    /// Give a member a role in the server: admin, moderator, member or one the server defined.
    Role {
        /// The server id.
        #[arg(id = "server_id", value_name = "SERVER")]
        server: u64,
        /// The member's name.
        user: String,
        /// The role.
        role: String,
    },
    /// Define a role of the server (or redefine `member`) by its permissions.
    DefineRole {
        /// The server id.
        #[arg(id = "server_id", value_name = "SERVER")]
        server: u64,
        /// The role's name.
        name: String,
        /// Its permissions (as for `room define-role`).
        #[arg(required_unless_present = "remove", value_name = "PERMISSION")]
        permissions: Vec<String>,
        /// Remove the definition instead.
        #[arg(long, conflicts_with = "permissions")]
        remove: bool,
    },
    /// Invite a user to the server (needs invite there): they join it with `server join`, private or not.
    Invite {
        /// The server id.
        #[arg(id = "server_id", value_name = "SERVER")]
        server: u64,
        /// The user's name.
        user: String,
    },
    /// Ban a user from the server (needs ban): removed, and refused by `server join` until unbanned.
    Ban {
        /// The server id.
        #[arg(id = "server_id", value_name = "SERVER")]
        server: u64,
        /// The user's name.
        user: String,
        /// Lift the ban instead.
        #[arg(long)]
        remove: bool,
    },
}

/// `channel` subcommands.
#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// Create a channel in a server (needs manage_channels there).
    Create {
        /// The server id.
        #[arg(id = "server_id", value_name = "SERVER")]
        server: u64,
        /// The channel's name.
        name: String,
        /// A voice channel.
        #[arg(long)]
        voice: bool,
        /// Only these roles may read it (comma-separated; owners and admins always may).
        #[arg(long, value_delimiter = ',', value_name = "ROLE,...")]
        read_roles: Vec<String>,
        /// Only these roles may post in it.
        #[arg(long, value_delimiter = ',', value_name = "ROLE,...")]
        post_roles: Vec<String>,
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

    /// A server id argument must not collide with the global `--server` address.
    #[test]
    fn server_ids_and_the_server_address_live_side_by_side() {
        let cli = Cli::try_parse_from([
            "chime",
            "--server",
            "h:1",
            "channel",
            "create",
            "4",
            "news",
            "--post-roles",
            "moderator,admin",
        ])
        .expect("valid command line");
        assert_eq!(cli.global.server, "h:1");
        match cli.command {
            Command::Channel { command: ChannelCommand::Create { server, name, post_roles, .. } } => {
                assert_eq!((server, name.as_str()), (4, "news"));
                assert_eq!(post_roles, ["moderator", "admin"]);
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["chime", "server", "join", "9"]).expect("valid command line");
        assert!(matches!(cli.command, Command::Server { command: ServerCommand::Join { server: 9 } }));
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
    fn profile_shows_or_changes_and_settings_take_a_key_with_a_value() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied()).map(|c| c.command);
        assert!(matches!(
            parse(&["chime", "profile"]),
            Ok(Command::Profile { user: None, email: None, clear_email: false, display_name: None })
        ));
        assert!(matches!(parse(&["chime", "profile", "bob"]), Ok(Command::Profile { user: Some(_), .. })));
        assert!(matches!(
            parse(&["chime", "profile", "--email", "", "--display-name", "Ann"]),
            Ok(Command::Profile { email: Some(e), display_name: Some(_), .. }) if e.is_empty()
        ));
        assert!(parse(&["chime", "profile", "bob", "--display-name", "x"]).is_err(), "not someone else's");
        assert!(parse(&["chime", "profile", "--email", "a@b", "--clear-email"]).is_err(), "not both");
        assert!(matches!(parse(&["chime", "settings"]), Ok(Command::Settings { key: None, value: None })));
        assert!(matches!(
            parse(&["chime", "settings", "notify.3", "none"]),
            Ok(Command::Settings { key: Some(_), value: Some(_) })
        ));
        assert!(parse(&["chime", "settings", "notify.3"]).is_err(), "a key needs a value");
        assert!(matches!(
            parse(&["chime", "register", "ann", "--email", "a@b", "--display-name", "Ann"]),
            Ok(Command::Register { email: Some(_), display_name: Some(_), .. })
        ));
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
