//! `chimed`, the Chime daemon, as a library; `main.rs` is only the command-line wiring.
//!
//! - [`config`]: the configuration struct, read from TOML and validated.
//! - [`cli`]: the command line (`chimed [serve]`, `migrate`, `node`, `admin`) and how flags override
//!   the file.
//! - [`tls`]: the server's certificate (given, or self-signed in the data dir) and rustls setup.
//! - [`auth`]: password hashing, session tokens, the rules for user names, passwords, email
//!   addresses and display names.
//! - [`user_settings`]: the settings a user's devices share: keys, values, defaults (pure).
//! - [`ratelimit`]: token buckets for accepts and logins, server-wide and per IP.
//! - [`server`]: the event loop (mio): listeners, accepting, reading, flushing, the transports'
//!   memory and timeouts, graceful stop. It only moves bytes.
//! - [`transport`]: one client connection's socket and buffers (TLS or plaintext, read buffer,
//!   bounded send queue).
//! - [`core`]: the I/O-free server core: every connection's protocol state driven by frames,
//!   completions and time, and the [`core::hub`] (who receives which room's pushes).
//! - [`handlers`]: one module per family of requests: validation on the loop, the job it runs on a
//!   worker.
//! - [`work`]: the jobs and the effects the loop and the workers exchange.
//! - [`sync`]: the per-connection SYNC state machine that keeps delivery gap-free (pure).
//! - [`worker`]: the database worker pool (one store connection per thread, group commit).
//! - [`limits`]: every fixed limit, named once.
//! - [`health`]: whether the database is usable, and each worker's store, reopened after it
//!   fails (a database restart, a full disk).
//! - [`notify`]: the push-notification path: a delay a read cancels, then a gateway (a spool
//!   file).
//! - [`node`]: storage nodes reached through `ssh`: the agent (`chimed node`), its protocol and
//!   object store, and the daemon's [`node::NodeLink`]s to them.
//!
//! Only the event loop touches sockets; anything slow (the database, password hashes) runs on
//! worker threads and comes back through channels.
#![deny(missing_docs)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod content;
pub mod core;
pub mod handlers;
pub mod health;
pub mod limits;
pub mod node;
pub mod notify;
pub mod ratelimit;
pub mod server;
pub mod sync;
pub mod tls;
pub mod transport;
pub mod user_settings;
pub mod work;
pub mod worker;

pub use config::{Config, ConfigError};
pub use tls::TlsSetup;
