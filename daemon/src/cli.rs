//! The `chimed` command line: clap definitions and how flags are laid over the config file.
//!
//! `serve` is the default subcommand, so `chimed --listen ADDR` and `chimed serve --listen ADDR`
//! mean the same. Every serve flag is optional and, when given, overrides the key of the same
//! name in the config file (which overrides the built-in default). `chimed node` is the storage
//! agent the daemon starts on a node through ssh; `chimed admin` holds operators' commands.

use crate::config::{Config, ConfigError};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// `chimed [serve] [FLAGS]`, `chimed migrate [FLAGS]`, `chimed node --root DIR` or
/// `chimed admin ...`.
#[derive(Debug, Parser)]
#[command(
    name = "chimed",
    version,
    about = "The Chime instant-messaging daemon.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; `serve` when absent.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The serve flags, when no subcommand is named.
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Cli {
    /// The command to run, with `serve` filled in as the default.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(Box::new(self.serve)))
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Serve(Box<ServeArgs>),
    /// Apply the database schema migrations and exit.
    Migrate(MigrateArgs),
    /// Run the storage agent of a node on stdin/stdout (the daemon starts it through ssh).
    Node(NodeArgs),
    /// Administration commands.
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// Flags of `chimed node`.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Directory of the node's object store (created if missing).
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
}

/// `chimed admin` subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Connect to every configured storage node and print its state, space and object count
    /// (exit 1 if any is unreachable).
    Nodes(AdminNodesArgs),
    /// Re-hash every object on a storage node and print the bad ones (exit 1 if any).
    Verify(AdminVerifyArgs),
    /// Rebalance the file cache and the nodes now: through the running daemon when one has the
    /// cache open, else in this process (exit 1 if anything failed).
    Rebalance(AdminRebalanceArgs),
}

/// Flags of `chimed admin rebalance`.
#[derive(Debug, Clone, Args)]
pub struct AdminRebalanceArgs {
    /// The daemon's TOML config file ([files] and [[node]] tables, data_dir).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The daemon's data directory, if not the config file's [default: ./chime-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the rebalance to finish (and for each node when run here).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
}

/// Flags of `chimed admin nodes`.
#[derive(Debug, Clone, Args)]
pub struct AdminNodesArgs {
    /// TOML config file listing the nodes ([[node]] tables).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// One JSON object per node and line.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for each node.
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    pub timeout: u64,
}

/// Flags of `chimed admin verify`.
#[derive(Debug, Clone, Args)]
pub struct AdminVerifyArgs {
    /// The node's name in the config file.
    pub node: String,
    /// TOML config file listing the nodes ([[node]] tables).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// One JSON object per bad object and line, then a summary object.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the node's next answer (a running verify reports every second).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

/// Loads and validates the config file of an admin command (the defaults when none is given).
pub fn admin_config(path: Option<&std::path::Path>) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    config.validate()?;
    Ok(config)
}

/// Flags of `chimed serve`. Each `Option` left `None` keeps the config file's value.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file with the same keys as the long flags (data_dir, listen, ...).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// TLS listen address [default: 127.0.0.1:7878].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Extra plaintext listener (loopback only unless --allow-public-plaintext).
    #[arg(long, value_name = "ADDR")]
    pub plaintext_listen: Option<String>,
    /// Allow --plaintext-listen on a non-loopback address.
    #[arg(long)]
    pub allow_public_plaintext: bool,
    /// Data directory: embedded database, self-signed certificate, file cache [default: ./chime-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL: sqlite:PATH or postgres://USER@HOST:PORT/DB [default: $CHIMED_DATABASE_URL,
    /// else sqlite:DATA_DIR/chime.db].
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// TLS certificate chain (PEM), with --tls-key [default: self-signed in DATA_DIR/tls].
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM), with --tls-cert.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Database worker threads.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Seconds between pings on a quiet connection.
    #[arg(long, value_name = "N")]
    pub heartbeat_secs: Option<u32>,
    /// Bytes a connection may have queued for sending before it is cut off.
    #[arg(long, value_name = "N")]
    pub max_outbound_bytes: Option<usize>,
    /// Most simultaneous connections.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// New connections accepted per second.
    #[arg(long, value_name = "N")]
    pub accept_rate: Option<u32>,
    /// Password logins and registrations per second, server-wide.
    #[arg(long, value_name = "N")]
    pub login_rate: Option<u32>,
    /// Connections at most from one IPv4 address or IPv6 /64.
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// Seconds a connection may stay without logging in.
    #[arg(long, value_name = "SECS")]
    pub auth_timeout_secs: Option<u32>,
    /// Seconds queued output may wait with no write progress before the connection is closed.
    #[arg(long, value_name = "SECS")]
    pub write_timeout_secs: Option<u32>,
    /// Bytes all outbound queues together may cost.
    #[arg(long, value_name = "N")]
    pub max_outbound_total_bytes: Option<usize>,
    /// Rooms one user may be a member of.
    #[arg(long, value_name = "N")]
    pub max_rooms_per_user: Option<u64>,
    /// Rooms one user may create per minute.
    #[arg(long, value_name = "N")]
    pub room_create_per_minute: Option<u32>,
    /// RESUME attempts per second from one address.
    #[arg(long, value_name = "N")]
    pub resume_rate_per_ip: Option<u32>,
    /// Seconds a session may go unused before it expires.
    #[arg(long, value_name = "SECS")]
    pub session_idle_secs: Option<u64>,
    /// Seconds a session lives at most from its password login.
    #[arg(long, value_name = "SECS")]
    pub session_max_age_secs: Option<u64>,
    /// Milliseconds a write to the embedded store waits for a lock.
    #[arg(long, value_name = "MS")]
    pub database_busy_timeout_ms: Option<u64>,
    /// RESTORE pages one user may read per second.
    #[arg(long, value_name = "N")]
    pub restore_pages_per_sec: Option<u32>,
    /// RESTORE pages one user may read at once after a quiet spell.
    #[arg(long, value_name = "N")]
    pub restore_burst: Option<u32>,
    /// Deltas per partition of each new room's log.
    #[arg(long, value_name = "N")]
    pub partition_size: Option<u64>,
    /// Validate the configuration, print "configuration ok" and exit.
    #[arg(short = 't', long)]
    pub check_config: bool,
}

impl ServeArgs {
    /// The configuration to serve with: the file (or defaults), the flags over it, validated.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load(self.config.as_deref())?;
        self.apply(&mut config);
        config.validate()?;
        Ok(config)
    }

    /// Lays the given flags over `config`.
    pub fn apply(&self, config: &mut Config) {
        set(&mut config.listen, &self.listen);
        if self.plaintext_listen.is_some() {
            config.plaintext_listen.clone_from(&self.plaintext_listen);
        }
        // A switch can only turn this on: its absence on the command line says nothing.
        config.allow_public_plaintext |= self.allow_public_plaintext;
        set(&mut config.data_dir, &self.data_dir);
        if self.database.is_some() {
            config.database.clone_from(&self.database);
        }
        if self.tls_cert.is_some() {
            config.tls_cert.clone_from(&self.tls_cert);
        }
        if self.tls_key.is_some() {
            config.tls_key.clone_from(&self.tls_key);
        }
        set(&mut config.workers, &self.workers);
        set(&mut config.heartbeat_secs, &self.heartbeat_secs);
        set(&mut config.max_outbound_bytes, &self.max_outbound_bytes);
        set(&mut config.max_connections, &self.max_connections);
        set(&mut config.accept_rate, &self.accept_rate);
        set(&mut config.login_rate, &self.login_rate);
        set(&mut config.max_connections_per_ip, &self.max_connections_per_ip);
        set(&mut config.auth_timeout_secs, &self.auth_timeout_secs);
        set(&mut config.write_timeout_secs, &self.write_timeout_secs);
        set(&mut config.max_outbound_total_bytes, &self.max_outbound_total_bytes);
        set(&mut config.max_rooms_per_user, &self.max_rooms_per_user);
        set(&mut config.room_create_per_minute, &self.room_create_per_minute);
        set(&mut config.resume_rate_per_ip, &self.resume_rate_per_ip);
        set(&mut config.session_idle_secs, &self.session_idle_secs);
        set(&mut config.session_max_age_secs, &self.session_max_age_secs);
        set(&mut config.database_busy_timeout_ms, &self.database_busy_timeout_ms);
        set(&mut config.restore_pages_per_sec, &self.restore_pages_per_sec);
        set(&mut config.restore_burst, &self.restore_burst);
        set(&mut config.partition_size, &self.partition_size);
    }
}

/// Flags of `chimed migrate`.
#[derive(Debug, Clone, Default, Args)]
pub struct MigrateArgs {
    /// TOML config file (its database and data_dir keys are used).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Database URL [default: $CHIMED_DATABASE_URL, else sqlite:DATA_DIR/chime.db].
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// Data directory holding the embedded database [default: ./chime-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl MigrateArgs {
    /// The configuration: the file (or defaults), the flags over it, validated.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load(self.config.as_deref())?;
        set(&mut config.data_dir, &self.data_dir);
        if self.database.is_some() {
            config.database.clone_from(&self.database);
        }
        config.validate()?;
        Ok(config)
    }
}

fn set<T: Clone>(target: &mut T, flag: &Option<T>) {
    if let Some(value) = flag {
        target.clone_from(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Command {
        let argv = std::iter::once("chimed").chain(args.iter().copied());
        Cli::try_parse_from(argv).expect("valid command line").into_command()
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        match parse(args) {
            Command::Serve(serve) => *serve,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_is_the_default() {
        let bare = serve_args(&["--listen", "127.0.0.1:1", "-t"]);
        let named = serve_args(&["serve", "--listen", "127.0.0.1:1", "--check-config"]);
        assert_eq!(bare.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(named.listen, bare.listen);
        assert!(bare.check_config && named.check_config);
        assert_eq!(serve_args(&[]).resolve().ok(), Some(Config::default()));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("chimed.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nworkers = 4\nlogin_rate = 7\ndatabase = \"sqlite:/a.db\"\n",
        )
        .expect("write");
        let file_arg = file.to_str().expect("utf-8 temp path");
        let args = serve_args(&[
            "--config",
            file_arg,
            "--workers",
            "9",
            "--database",
            "sqlite:/b.db",
            "--plaintext-listen",
            "0.0.0.0:9001",
            "--allow-public-plaintext",
        ]);
        let config = args.resolve().expect("valid");
        assert_eq!(config.listen, "127.0.0.1:9000");
        assert_eq!(config.workers, 9);
        assert_eq!(config.login_rate, 7);
        assert_eq!(config.database.as_deref(), Some("sqlite:/b.db"));
        assert_eq!(config.plaintext_listen.as_deref(), Some("0.0.0.0:9001"));
        assert!(config.allow_public_plaintext);
    }

    #[test]
    fn merged_result_is_validated() {
        let err = serve_args(&["--plaintext-listen", "0.0.0.0:9001"]).resolve().expect_err("public plaintext");
        assert!(matches!(err, ConfigError::Invalid { key: "plaintext_listen", .. }), "{err:?}");
        let err = serve_args(&["--tls-cert", "c.pem"]).resolve().expect_err("cert alone");
        assert!(matches!(err, ConfigError::Invalid { key: "tls_key", .. }), "{err:?}");
        assert!(serve_args(&["--workers", "0"]).resolve().is_err());
    }

    #[test]
    fn migrate_takes_database_and_data_dir() {
        let Command::Migrate(args) = parse(&["migrate", "--database", "sqlite:/tmp/x.db", "--data-dir", "/d"]) else {
            panic!("expected migrate");
        };
        let config = args.resolve().expect("valid");
        assert_eq!(config.database_url(), "sqlite:/tmp/x.db");
        assert_eq!(config.data_dir, PathBuf::from("/d"));
    }

    #[test]
    fn node_and_admin_commands() {
        let Command::Node(args) = parse(&["node", "--root", "/srv/chime"]) else { panic!("expected node") };
        assert_eq!(args.root, PathBuf::from("/srv/chime"));
        let Command::Admin(AdminCommand::Nodes(args)) = parse(&["admin", "nodes", "--json", "--config", "c.toml"])
        else {
            panic!("expected admin nodes");
        };
        assert!(args.json);
        assert_eq!(args.config, Some(PathBuf::from("c.toml")));
        assert_eq!(args.timeout, 20);
        let Command::Admin(AdminCommand::Verify(args)) = parse(&["admin", "verify", "n1"]) else {
            panic!("expected admin verify");
        };
        assert_eq!(args.node, "n1");
        assert!(!args.json);
        let Command::Admin(AdminCommand::Rebalance(args)) = parse(&["admin", "rebalance", "--data-dir", "/d"]) else {
            panic!("expected admin rebalance");
        };
        assert_eq!((args.data_dir, args.timeout), (Some(PathBuf::from("/d")), 600));
        for bad in [&["node"][..], &["admin"], &["admin", "verify"], &["admin", "rebalance", "n1"]] {
            let argv = std::iter::once("chimed").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_command_lines_are_usage_errors() {
        for bad in [
            &["--workers", "many"][..],
            &["--no-such-flag"],
            &["migrate", "--listen", "127.0.0.1:1"],
            &["--listen", "127.0.0.1:1", "serve"],
        ] {
            let argv = std::iter::once("chimed").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }
}
