//! Chime's client library: everything a Chime client does besides drawing its screen.
//!
//! The layers, from the protocol up (the shape of quinn: a sans-I/O core, then drivers):
//!
//! - [`session`]: one connection's protocol state with no I/O and no clock: the handshake,
//!   request ids and replies, answering server pings, the heartbeat, SYNC page checks, and per-room
//!   cursors with gap and duplicate detection (written once, here). Bytes in, events and bytes out.
//! - [`blocking`]: [`blocking::Client`], a request/reply client over `std::net` + rustls driving a
//!   session; what `chime`, the setup phase of `chime-load` and the integration tests use.
//! - [`nonblocking`]: [`nonblocking::Connection`], a session over a `mio` socket (plaintext or
//!   TLS) driven by the caller's poll loop; what `chime-load` and a full-screen client use.
//! - [`tls`]: trust-on-first-use certificate pinning for rustls, shared by both drivers.
//! - [`home`]: the home directory `chime` keeps its session tokens and pinned fingerprints in.
//! - [`backoff`]: exponential backoff with jitter for retries and reconnects.
//!
//! The wire format itself (frames, bodies, codes, the fingerprint format) is `chime-protocol`,
//! which has no TLS or socket code; this crate brings rustls. Nothing here is Unix-only except
//! the file modes [`home`] sets where there are modes, so the library builds for Windows.
#![deny(missing_docs)]

pub mod backoff;
pub mod blocking;
mod error;
pub mod home;
mod idempotency;
pub mod nonblocking;
pub mod session;
pub mod tls;

pub use chime_protocol::fingerprint::{cert_fingerprint, fingerprint_hex, parse_fingerprint};
pub use error::ClientError;
pub use idempotency::new_idempotency_key;
pub use session::{Event, Session, SessionConfig, SessionError, Tick};
