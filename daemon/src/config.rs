//! The daemon's configuration: a serde struct read from TOML, overridden by flags.
//!
//! (Skeleton: the struct and defaults are fixed; loading, merging with flags and `validate()`
//! are filled in by the config work.)

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
        }
    }
}
