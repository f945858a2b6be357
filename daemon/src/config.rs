//! The daemon's configuration: a serde struct read from TOML, overridden by flags.
//!
//! The order of precedence is: built-in defaults, then the TOML file (`--config FILE`), then the
//! command-line flags (applied by [`crate::cli`]). [`Config::validate`] runs once on the merged
//! result, so a bad value is reported the same way whichever source it came from.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The environment variable that replaces the default (embedded) database URL.
pub const DATABASE_URL_ENV: &str = "CHIMED_DATABASE_URL";

/// Bounds on `max_frame`: below 1 KiB ordinary requests do not fit; no frame may be larger than
/// the protocol's maximum, 1 MiB (clients' encoders refuse larger ones).
const MIN_FRAME: u32 = 1 << 10;
const MAX_FRAME: u32 = chime_protocol::MAX_FRAME;
/// A send queue smaller than this cannot hold one full sync page plus live traffic.
const MIN_OUTBOUND_BYTES: usize = 64 << 10;

/// Why a configuration could not be loaded or is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a value of the wrong type.
    #[error("config file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line and column, on one line.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {key}: {reason}")]
    Invalid {
        /// The key (as in the file; the flag is the same name with dashes).
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Everything `chimed serve` needs to know. Keys match the long flags (`listen`, `data_dir`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TLS listen address.
    pub listen: String,
    /// Optional extra plaintext listener.
    pub plaintext_listen: Option<String>,
    /// Allow `plaintext_listen` on a non-loopback address.
    pub allow_public_plaintext: bool,
    /// Where the embedded store, the self-signed certificate and the file cache live.
    pub data_dir: PathBuf,
    /// Database URL; `None` means `sqlite:DATA_DIR/chime.db` (or `CHIMED_DATABASE_URL`).
    pub database: Option<String>,
    /// TLS certificate chain (PEM); with `tls_key`. `None`: self-signed in the data dir.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Database worker threads (each owns one connection); posts are sharded over them by room.
    pub workers: usize,
    /// Threads that hash passwords (argon2id is deliberately slow; kept off the post path).
    pub auth_workers: usize,
    /// Largest frame length accepted.
    pub max_frame: u32,
    /// Seconds between server pings on a quiet connection; silence for 3x this closes it.
    pub heartbeat_secs: u32,
    /// Bytes a connection may have queued for sending before it is cut off (resync required).
    pub max_outbound_bytes: usize,
    /// Connections accepted at most; keep under the process's open-file limit.
    pub max_connections: usize,
    /// New connections per second accepted (token bucket; burst of the same size).
    pub accept_rate: u32,
    /// Password logins and registrations per second, server-wide (token bucket).
    pub login_rate: u32,
    /// Most posts one worker commits in one transaction.
    pub max_batch: usize,
    /// Connections accepted at most from one IPv4 address or one IPv6 /64; the rest are closed
    /// at once. Counts connections of every state, logged in or not.
    pub max_connections_per_ip: usize,
    /// Seconds a connection may stay without logging in (after its handshake or a LOGOUT)
    /// before it is closed with GOODBYE `AUTH_TIMEOUT`.
    pub auth_timeout_secs: u32,
    /// Seconds a connection may leave queued output unwritten with no progress at all (a peer
    /// that stopped reading, or a zero TCP window) before it is closed.
    pub write_timeout_secs: u32,
    /// Bytes that every connection's outbound queues together may cost; past it, the largest
    /// queues are cut off (GOODBYE `RESYNC_REQUIRED`) until the total is under it again.
    pub max_outbound_total_bytes: usize,
    /// Rooms one user may be a member of; joining or creating more is refused `LIMIT_REACHED`.
    pub max_rooms_per_user: u64,
    /// Rooms one user may create per minute (token bucket, bursts of the same size).
    pub room_create_per_minute: u32,
    /// RESUME attempts per second from one address (token bucket, bursts of the same size):
    /// every attempt is a database write, and a token guess.
    pub resume_rate_per_ip: u32,
    /// Seconds a session may go unused (no login, resume or connection) before it expires.
    pub session_idle_secs: u64,
    /// Seconds a session lives at most from its password login, however much it is used.
    pub session_max_age_secs: u64,
    /// How long a write to the embedded store waits for another connection's lock (ms) before
    /// the request is answered `UNAVAILABLE`.
    pub database_busy_timeout_ms: u64,
    /// RESTORE pages one user may read per second (token bucket): at the largest page, 1,000
    /// deltas each, the default reads a million-delta room in about 3 s, and no faster.
    pub restore_pages_per_sec: u32,
    /// RESTORE pages one user may read at once after a quiet spell (the bucket's size).
    pub restore_burst: u32,
    /// Deltas per partition of each new room's log (a room keeps the size it was created with).
    pub partition_size: u64,
    /// Uploaded files: their size limit, the local cache, how many node copies (`[files]`).
    pub files: FilesConfig,
    /// The storage nodes cold files move to (`[[node]]`, one table per node).
    pub node: Vec<NodeConfig>,
    /// The push-notification path (`[notify]`).
    pub notify: NotifyConfig,
}

/// The `[notify]` table: when a mention (or a direct message) becomes a push notification, and
/// where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// How long a notification waits before it is handed to the gateway; a read of the message
    /// (on any device) in the meantime cancels it.
    pub delay_ms: u64,
    /// The spool file notifications are appended to, one JSON line each: the hook a push gateway
    /// reads. `None` (the default): no notification is queued at all.
    pub spool: Option<PathBuf>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig { delay_ms: 30_000, spool: None }
    }
}

/// The `[files]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Largest upload accepted, in bytes.
    pub max_size: u64,
    /// Where uploaded files are kept locally; `None`: `DATA_DIR/cache`.
    pub cache_dir: Option<PathBuf>,
    /// Bytes the cache may hold before files move to nodes.
    pub cache_quota: u64,
    /// On how many nodes a file is kept once it leaves the cache.
    pub copies: u32,
    /// Seconds between two background rebalances (cold content out, copies restored, nodes
    /// short of space drained); `chimed admin rebalance` runs one at once.
    pub rebalance_interval_secs: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            max_size: 100 << 20,
            cache_dir: None,
            cache_quota: 10 << 30,
            copies: 1,
            rebalance_interval_secs: 3600,
        }
    }
}

/// One `[[node]]` table: a storage node reached with the system's `ssh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// A short unique name (letters, digits, `.`, `_`, `-`), used in logs and `chimed admin`.
    pub name: String,
    /// Any destination `ssh` accepts: `ssh://user@host:port`, `user@host`, a `Host` alias of
    /// ssh_config (which is where ProxyJump and friends go).
    pub ssh: String,
    /// Extra `ssh` arguments, placed before Chime's own (`-i KEY`, `-F FILE`, `-o ...`); for each
    /// option ssh keeps the first value it is given, so these win.
    #[serde(default)]
    pub ssh_options: Vec<String>,
    /// The object store's directory on the node (created if missing).
    pub root: String,
    /// The command that starts `chimed` on the node, as the remote shell should run it.
    #[serde(default = "default_agent")]
    pub agent: String,
    /// Preferred nodes first: a node with a higher priority gets new files while it has room.
    #[serde(default)]
    pub priority: i32,
}

fn default_agent() -> String {
    "chimed".into()
}

impl NodeConfig {
    /// Whether a node name is acceptable: 1 to 64 of `[A-Za-z0-9._-]`.
    pub fn valid_name(name: &str) -> bool {
        (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7878".into(),
            plaintext_listen: None,
            allow_public_plaintext: false,
            data_dir: PathBuf::from("./chime-data"),
            database: None,
            tls_cert: None,
            tls_key: None,
            workers: 2,
            auth_workers: 1,
            max_frame: chime_protocol::DEFAULT_MAX_FRAME,
            heartbeat_secs: 30,
            max_outbound_bytes: 4 << 20,
            max_connections: 19_000,
            accept_rate: 2_000,
            login_rate: 50,
            max_batch: 512,
            max_connections_per_ip: 128,
            auth_timeout_secs: 30,
            write_timeout_secs: 30,
            max_outbound_total_bytes: 256 << 20,
            max_rooms_per_user: 10_000,
            room_create_per_minute: 10,
            resume_rate_per_ip: 20,
            session_idle_secs: 14 * 86_400,
            session_max_age_secs: 90 * 86_400,
            database_busy_timeout_ms: 5_000,
            restore_pages_per_sec: 200,
            restore_burst: 400,
            partition_size: chime_storage::DEFAULT_PARTITION_SIZE,
            files: FilesConfig::default(),
            node: Vec::new(),
            notify: NotifyConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file, or returns the defaults when `path` is `None`. Keys missing from the
    /// file keep their defaults; an unknown key is an error. Does not validate.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_path_buf(), message })
    }

    /// Parses TOML text. The error is one line: `line L, column C: MESSAGE`.
    fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            // toml's Display draws the offending line with a caret over several lines; the
            // daemon reports errors on one line, so only the position and the message are kept.
            let message = e.message().trim().replace('\n', " ");
            match e.span() {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    format!("line {line}, column {column}: {message}")
                }
                None => message,
            }
        })
    }

    /// Checks every value; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });

        if let Err(e) = self.listen.parse::<SocketAddr>() {
            return invalid("listen", format!("{:?} is not an IP:PORT address ({e})", self.listen));
        }
        if let Some(plain) = &self.plaintext_listen {
            match plain.parse::<SocketAddr>() {
                Err(e) => return invalid("plaintext_listen", format!("{plain:?} is not an IP:PORT address ({e})")),
                Ok(addr) if !addr.ip().is_loopback() && !self.allow_public_plaintext => {
                    return invalid(
                        "plaintext_listen",
                        format!(
                            "{addr} is not a loopback address; unencrypted traffic off this \
                             machine needs allow_public_plaintext (--allow-public-plaintext)"
                        ),
                    )
                }
                Ok(_) => {}
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return invalid("tls_key", "tls_cert is given without tls_key".into()),
            (None, Some(_)) => return invalid("tls_cert", "tls_key is given without tls_cert".into()),
            _ => {}
        }
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty".into());
        }
        if let Some(url) = &self.database {
            if url.trim().is_empty() {
                return invalid("database", "must not be empty".into());
            }
        }

        let at_least = |key, value: u64, min: u64| {
            if value < min {
                invalid(key, format!("is {value}, must be at least {min}"))
            } else {
                Ok(())
            }
        };
        at_least("workers", self.workers as u64, 1)?;
        at_least("auth_workers", self.auth_workers as u64, 1)?;
        at_least("heartbeat_secs", u64::from(self.heartbeat_secs), 1)?;
        at_least("max_outbound_bytes", self.max_outbound_bytes as u64, MIN_OUTBOUND_BYTES as u64)?;
        at_least("max_connections", self.max_connections as u64, 1)?;
        at_least("accept_rate", u64::from(self.accept_rate), 1)?;
        at_least("login_rate", u64::from(self.login_rate), 1)?;
        at_least("max_batch", self.max_batch as u64, 1)?;
        at_least("max_connections_per_ip", self.max_connections_per_ip as u64, 1)?;
        at_least("auth_timeout_secs", u64::from(self.auth_timeout_secs), 1)?;
        at_least("write_timeout_secs", u64::from(self.write_timeout_secs), 1)?;
        at_least("max_rooms_per_user", self.max_rooms_per_user, 1)?;
        at_least("room_create_per_minute", u64::from(self.room_create_per_minute), 1)?;
        at_least("resume_rate_per_ip", u64::from(self.resume_rate_per_ip), 1)?;
        at_least("session_idle_secs", self.session_idle_secs, 1)?;
        at_least("session_max_age_secs", self.session_max_age_secs, 1)?;
        at_least("database_busy_timeout_ms", self.database_busy_timeout_ms, 1)?;
        at_least("restore_pages_per_sec", u64::from(self.restore_pages_per_sec), 1)?;
        at_least("restore_burst", u64::from(self.restore_burst), 1)?;
        at_least("partition_size", self.partition_size, 1)?;
        if self.max_outbound_total_bytes < self.max_outbound_bytes {
            return invalid(
                "max_outbound_total_bytes",
                format!(
                    "is {}, must be at least max_outbound_bytes ({})",
                    self.max_outbound_total_bytes, self.max_outbound_bytes
                ),
            );
        }
        if !(MIN_FRAME..=MAX_FRAME).contains(&self.max_frame) {
            return invalid(
                "max_frame",
                format!("is {}, must be between {MIN_FRAME} and {MAX_FRAME} bytes", self.max_frame),
            );
        }
        if self.notify.spool.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return invalid("notify.spool", "must not be empty".into());
        }
        if self.notify.delay_ms > 86_400_000 {
            return invalid("notify.delay_ms", format!("is {}, must be at most a day", self.notify.delay_ms));
        }
        self.validate_files()
    }

    /// Checks `[files]` and every `[[node]]`.
    fn validate_files(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let files = &self.files;
        if files.max_size == 0 {
            return invalid("files.max_size", "must be at least 1".into());
        }
        if files.cache_quota < files.max_size {
            return invalid(
                "files.cache_quota",
                format!(
                    "is {}, must be at least files.max_size ({}): the cache holds every upload first",
                    files.cache_quota, files.max_size
                ),
            );
        }
        if files.cache_dir.as_ref().is_some_and(|dir| dir.as_os_str().is_empty()) {
            return invalid("files.cache_dir", "must not be empty".into());
        }
        if files.rebalance_interval_secs == 0 {
            return invalid("files.rebalance_interval_secs", "must be at least 1".into());
        }
        if files.copies == 0 {
            return invalid("files.copies", "must be at least 1".into());
        }
        if !self.node.is_empty() && files.copies as usize > self.node.len() {
            return invalid(
                "files.copies",
                format!("is {}, but only {} nodes are configured", files.copies, self.node.len()),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, node) in self.node.iter().enumerate() {
            let which = format!("[[node]] number {} ({:?})", i + 1, node.name);
            if !NodeConfig::valid_name(&node.name) {
                return invalid("node.name", format!("{which}: a name is 1 to 64 letters, digits, '.', '_' or '-'"));
            }
            if !names.insert(node.name.as_str()) {
                return invalid("node.name", format!("{which}: another node has the same name"));
            }
            let ssh = node.ssh.trim();
            if ssh.is_empty() {
                return invalid("node.ssh", format!("{which}: must not be empty"));
            }
            if ssh.starts_with('-') {
                return invalid(
                    "node.ssh",
                    format!("{which}: a destination, not an option (options go in ssh_options)"),
                );
            }
            if node.root.trim().is_empty() {
                return invalid("node.root", format!("{which}: must not be empty"));
            }
            if node.agent.trim().is_empty() {
                return invalid("node.agent", format!("{which}: must not be empty"));
            }
        }
        Ok(())
    }

    /// The file cache's directory: `files.cache_dir`, else `DATA_DIR/cache`.
    pub fn cache_dir(&self) -> PathBuf {
        self.files.cache_dir.clone().unwrap_or_else(|| self.data_dir.join("cache"))
    }

    /// The database to use: the `database` key (or flag) if set, else `CHIMED_DATABASE_URL`,
    /// else the embedded store `sqlite:DATA_DIR/chime.db`.
    pub fn database_url(&self) -> String {
        self.database_url_with_env(std::env::var(DATABASE_URL_ENV).ok())
    }

    /// Whether [`Config::database_url`] is the embedded store inside the data dir (so the data
    /// dir must exist before the store is opened).
    pub fn database_in_data_dir(&self) -> bool {
        self.database_url() == self.default_database_url()
    }

    fn database_url_with_env(&self, env: Option<String>) -> String {
        if let Some(url) = &self.database {
            return url.clone();
        }
        match env {
            Some(url) if !url.trim().is_empty() => url,
            _ => self.default_database_url(),
        }
    }

    fn default_database_url(&self) -> String {
        format!("sqlite:{}", self.data_dir.join("chime.db").display())
    }

    /// Creates the data dir (and its parents) if missing. A new data dir is private to the
    /// daemon's user (0700): it holds the database and the TLS private key.
    pub fn create_data_dir(&self) -> std::io::Result<()> {
        create_private_dir(&self.data_dir)
    }

    /// Warns when the data dir can be read or entered by users other than the daemon's: it holds
    /// the database and the TLS key. (A directory chimed creates is 0700; an existing one is left
    /// as the operator made it.) Returns the warning, if any, for tests.
    pub fn warn_if_data_dir_is_shared(&self) -> Option<String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&self.data_dir).ok()?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                let message = format!(
                    "data dir {} is readable by other users (mode {mode:03o}); it holds the database and the \
                     TLS key: run `chmod 700 {}`",
                    self.data_dir.display(),
                    self.data_dir.display()
                );
                log::warn!("{message}");
                return Some(message);
            }
        }
        None
    }

    /// The listen addresses, parsed. Call after [`Config::validate`]; an unparsable address here
    /// is reported as the same error `validate` gives.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|e| ConfigError::Invalid {
            key: "listen",
            reason: format!("{:?} is not an IP:PORT address ({e})", self.listen),
        })
    }

    /// The plaintext listen address, parsed, if one is configured.
    pub fn plaintext_listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.plaintext_listen
            .as_deref()
            .map(|plain| {
                plain.parse().map_err(|e| ConfigError::Invalid {
                    key: "plaintext_listen",
                    reason: format!("{plain:?} is not an IP:PORT address ({e})"),
                })
            })
            .transpose()
    }
}

/// A database URL fit for logs and error messages: a password in `scheme://user:password@host`
/// is replaced by `***`.
pub fn redact_database_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!("{}{}:***{}", &url[..scheme_end + 3], &userinfo[..colon], &rest[at..]),
        None => url.to_string(),
    }
}

/// Creates `dir` and its missing parents; the directories created get mode 0700 on Unix.
/// An existing directory is left as it is.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_key(config: &Config) -> &'static str {
        match config.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate().ok(), Some(()));
        assert_eq!(Config::load(None).ok(), Some(Config::default()));
    }

    #[test]
    fn file_overrides_only_the_keys_it_names() {
        let config =
            Config::parse("listen = \"0.0.0.0:9000\"\nworkers = 8\ndatabase = \"postgres://chime@db/chime\"\n")
                .expect("valid toml");
        assert_eq!(config.listen, "0.0.0.0:9000");
        assert_eq!(config.workers, 8);
        assert_eq!(config.database.as_deref(), Some("postgres://chime@db/chime"));
        assert_eq!(config.heartbeat_secs, Config::default().heartbeat_secs);
        assert_eq!(config.validate().ok(), Some(()));
    }

    #[test]
    fn unknown_key_is_one_line_with_position() {
        let err = Config::parse("workers = 2\nlisten_addr = \"x\"\n").expect_err("unknown key");
        assert!(err.starts_with("line 2, column 1: "), "{err}");
        assert!(err.contains("listen_addr"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let err = Config::parse("workers = \"two\"").expect_err("wrong type");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chimed.toml");
        std::fs::write(&path, "bogus = 1\n").expect("write");
        let err = Config::load(Some(&path)).expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("bogus"), "{text}");

        let missing = dir.path().join("missing.toml");
        let err = Config::load(Some(&missing)).expect_err("missing file");
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn listen_addresses_must_parse() {
        let config = Config { listen: "localhost".into(), ..Config::default() };
        assert_eq!(invalid_key(&config), "listen");
        let config = Config { plaintext_listen: Some("127.0.0.1".into()), ..Config::default() };
        assert_eq!(invalid_key(&config), "plaintext_listen");
    }

    #[test]
    fn public_plaintext_needs_consent() {
        let mut config = Config { plaintext_listen: Some("0.0.0.0:7879".into()), ..Config::default() };
        assert_eq!(invalid_key(&config), "plaintext_listen");
        config.allow_public_plaintext = true;
        assert_eq!(config.validate().ok(), Some(()));

        for loopback in ["127.0.0.1:7879", "127.0.0.5:1", "[::1]:7879"] {
            let config = Config { plaintext_listen: Some(loopback.into()), ..Config::default() };
            assert_eq!(config.validate().ok(), Some(()), "{loopback}");
        }
        let config = Config { plaintext_listen: Some("[::]:7879".into()), ..Config::default() };
        assert_eq!(invalid_key(&config), "plaintext_listen");
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let config = Config { tls_cert: Some("c.pem".into()), ..Config::default() };
        assert_eq!(invalid_key(&config), "tls_key");
        let config = Config { tls_key: Some("k.pem".into()), ..Config::default() };
        assert_eq!(invalid_key(&config), "tls_cert");
        let config = Config { tls_cert: Some("c.pem".into()), tls_key: Some("k.pem".into()), ..Config::default() };
        assert_eq!(config.validate().ok(), Some(()));
    }

    #[test]
    fn numeric_bounds() {
        let d = Config::default;
        assert_eq!(invalid_key(&Config { workers: 0, ..d() }), "workers");
        assert_eq!(invalid_key(&Config { auth_workers: 0, ..d() }), "auth_workers");
        assert_eq!(invalid_key(&Config { heartbeat_secs: 0, ..d() }), "heartbeat_secs");
        assert_eq!(invalid_key(&Config { max_outbound_bytes: 65_535, ..d() }), "max_outbound_bytes");
        assert_eq!(invalid_key(&Config { max_connections: 0, ..d() }), "max_connections");
        assert_eq!(invalid_key(&Config { accept_rate: 0, ..d() }), "accept_rate");
        assert_eq!(invalid_key(&Config { login_rate: 0, ..d() }), "login_rate");
        assert_eq!(invalid_key(&Config { max_batch: 0, ..d() }), "max_batch");
        assert_eq!(invalid_key(&Config { max_frame: 1023, ..d() }), "max_frame");
        assert_eq!(invalid_key(&Config { max_frame: (1 << 20) + 1, ..d() }), "max_frame");
        assert_eq!(invalid_key(&Config { max_connections_per_ip: 0, ..d() }), "max_connections_per_ip");
        assert_eq!(invalid_key(&Config { auth_timeout_secs: 0, ..d() }), "auth_timeout_secs");
        assert_eq!(invalid_key(&Config { write_timeout_secs: 0, ..d() }), "write_timeout_secs");
        assert_eq!(invalid_key(&Config { max_rooms_per_user: 0, ..d() }), "max_rooms_per_user");
        assert_eq!(invalid_key(&Config { room_create_per_minute: 0, ..d() }), "room_create_per_minute");
        assert_eq!(invalid_key(&Config { resume_rate_per_ip: 0, ..d() }), "resume_rate_per_ip");
        assert_eq!(invalid_key(&Config { session_idle_secs: 0, ..d() }), "session_idle_secs");
        assert_eq!(invalid_key(&Config { session_max_age_secs: 0, ..d() }), "session_max_age_secs");
        assert_eq!(invalid_key(&Config { database_busy_timeout_ms: 0, ..d() }), "database_busy_timeout_ms");
        assert_eq!(invalid_key(&Config { restore_pages_per_sec: 0, ..d() }), "restore_pages_per_sec");
        assert_eq!(invalid_key(&Config { restore_burst: 0, ..d() }), "restore_burst");
        assert_eq!(invalid_key(&Config { partition_size: 0, ..d() }), "partition_size");
        assert_eq!(invalid_key(&Config { max_outbound_total_bytes: 1 << 20, ..d() }), "max_outbound_total_bytes");
        for ok in [
            Config { max_frame: 1024, ..d() },
            Config { max_frame: 1 << 20, ..d() },
            Config { max_outbound_bytes: 65_536, ..d() },
        ] {
            assert_eq!(ok.validate().ok(), Some(()));
        }
    }

    #[test]
    fn database_url_precedence() {
        let config = Config { data_dir: "/var/lib/chime".into(), ..Config::default() };
        assert_eq!(config.database_url_with_env(None), "sqlite:/var/lib/chime/chime.db");
        assert_eq!(config.database_url_with_env(Some(String::new())), "sqlite:/var/lib/chime/chime.db");
        assert_eq!(config.database_url_with_env(Some("postgres://env@h/db".into())), "postgres://env@h/db");
        let config = Config { database: Some("sqlite:/tmp/x.db".into()), ..config };
        assert_eq!(config.database_url_with_env(Some("postgres://env@h/db".into())), "sqlite:/tmp/x.db");
        assert_eq!(Config::default().default_database_url(), "sqlite:./chime-data/chime.db");
    }

    #[test]
    fn redaction_hides_only_the_password() {
        assert_eq!(redact_database_url("postgres://chime:s3cr@t@db:5432/chime"), "postgres://chime:***@db:5432/chime");
        assert_eq!(redact_database_url("postgres://chime@db/chime"), "postgres://chime@db/chime");
        assert_eq!(redact_database_url("sqlite:./chime-data/chime.db"), "sqlite:./chime-data/chime.db");
        assert_eq!(redact_database_url("postgresql://u:p@h"), "postgresql://u:***@h");
    }

    const NODES: &str = r#"
[files]
max_size = 1000
cache_quota = 5000
copies = 2

[[node]]
name = "n1"
ssh = "ssh://chime@node1.example:22"
ssh_options = ["-i", "/etc/chime/node_key"]
root = "/srv/chime"
agent = "/opt/chime/bin/chimed"

[[node]]
name = "n2"
ssh = "backup-node"
root = "/srv/chime"
priority = 5
"#;

    #[test]
    fn files_and_nodes_parse_with_defaults() {
        let config = Config::parse(NODES).expect("valid toml");
        assert_eq!(config.validate().ok(), Some(()));
        assert_eq!(
            config.files,
            FilesConfig {
                max_size: 1000,
                cache_dir: None,
                cache_quota: 5000,
                copies: 2,
                rebalance_interval_secs: 3600
            }
        );
        assert_eq!(config.node.len(), 2);
        assert_eq!(config.node[0].ssh_options, ["-i", "/etc/chime/node_key"]);
        assert_eq!(config.node[0].agent, "/opt/chime/bin/chimed");
        assert_eq!(config.node[0].priority, 0);
        assert_eq!(config.node[1].agent, "chimed");
        assert!(config.node[1].ssh_options.is_empty());
        assert_eq!(config.node[1].priority, 5);
        assert_eq!(config.cache_dir(), PathBuf::from("./chime-data/cache"));

        let defaults = Config::default();
        assert_eq!(defaults.files.max_size, 104_857_600);
        assert_eq!(defaults.files.cache_quota, 10 << 30);
        assert_eq!(defaults.files.copies, 1);
        assert!(defaults.node.is_empty());
        let config = Config::parse("[files]\ncache_dir = \"/var/cache/chime\"\n").expect("valid");
        assert_eq!(config.cache_dir(), PathBuf::from("/var/cache/chime"));
    }

    #[test]
    fn node_tables_need_name_ssh_and_root_and_know_their_keys() {
        for (missing, text) in [
            ("name", "[[node]]\nssh = \"h\"\nroot = \"/r\"\n"),
            ("ssh", "[[node]]\nname = \"a\"\nroot = \"/r\"\n"),
            ("root", "[[node]]\nname = \"a\"\nssh = \"h\"\n"),
        ] {
            let err = Config::parse(text).expect_err(missing);
            assert!(err.contains(missing), "{err}");
        }
        let err =
            Config::parse("[[node]]\nname = \"a\"\nssh = \"h\"\nroot = \"/r\"\nport = 22\n").expect_err("unknown key");
        assert!(err.contains("port"), "{err}");
        let err = Config::parse("[files]\nmax = 1\n").expect_err("unknown key");
        assert!(err.contains("max"), "{err}");
    }

    #[test]
    fn files_and_nodes_are_validated() {
        let base = || Config::parse(NODES).expect("valid toml");
        let with = |f: &dyn Fn(&mut Config)| {
            let mut config = base();
            f(&mut config);
            invalid_key(&config)
        };
        assert_eq!(with(&|c| c.node[1].name = "n1".into()), "node.name");
        assert_eq!(with(&|c| c.node[1].name = String::new()), "node.name");
        assert_eq!(with(&|c| c.node[1].name = "has space".into()), "node.name");
        assert_eq!(with(&|c| c.node[0].ssh = "  ".into()), "node.ssh");
        assert_eq!(with(&|c| c.node[0].ssh = "-oProxyCommand=x".into()), "node.ssh");
        assert_eq!(with(&|c| c.node[0].root = String::new()), "node.root");
        assert_eq!(with(&|c| c.node[0].agent = String::new()), "node.agent");
        assert_eq!(with(&|c| c.files.copies = 3), "files.copies");
        assert_eq!(with(&|c| c.files.copies = 0), "files.copies");
        assert_eq!(with(&|c| c.files.max_size = 0), "files.max_size");
        assert_eq!(with(&|c| c.files.cache_quota = 999), "files.cache_quota");
        assert_eq!(with(&|c| c.files.cache_dir = Some(PathBuf::new())), "files.cache_dir");
        // Without nodes, files stay in the cache whatever `copies` says.
        let config = Config { files: FilesConfig { copies: 3, ..FilesConfig::default() }, ..Config::default() };
        assert_eq!(config.validate().ok(), Some(()));
    }

    #[cfg(unix)]
    #[test]
    fn data_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config { data_dir: dir.path().join("a/b"), ..Config::default() };
        config.create_data_dir().expect("create");
        config.create_data_dir().expect("create again is fine");
        let mode = std::fs::metadata(&config.data_dir).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
