//! `chimed`, the Chime daemon, as a library; `main.rs` is only the command-line wiring.
//!
//! - [`config`]: the configuration struct, read from TOML and validated.
//! - [`cli`]: the command line (`chimed [serve]`, `chimed migrate`) and how flags override the file.
//! - [`tls`]: the server's certificate (given, or self-signed in the data dir) and rustls setup.
//! - [`auth`]: password hashing, session tokens, user name and password rules.
//! - [`ratelimit`]: token buckets for accepts and logins, server-wide and per IP.
//! - [`server`]: the event loop (mio): listeners, accepting, dispatch, fan-out, heartbeats,
//!   graceful stop.
//! - [`conn`]: one client connection (TLS or plaintext, read buffer, bounded send queue).
//! - [`sync`]: the per-connection SYNC state machine that keeps delivery gap-free (pure).
//! - [`worker`]: the database worker pool (one store connection per thread, group commit).
//! - [`health`]: whether the database is usable, and each worker's store, reopened after it
//!   fails (a database restart, a full disk).
//!
//! Only the event loop touches sockets; anything slow (the database, password hashes) runs on
//! worker threads and comes back through channels.
#![deny(missing_docs)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod conn;
pub mod health;
pub mod ratelimit;
pub mod server;
pub mod sync;
pub mod tls;
pub mod worker;

pub use config::{Config, ConfigError};
pub use tls::TlsSetup;
