//! Building blocks of the `chime-load` generator, kept in the library so they can be unit-tested
//! without a daemon: message stamps, loss/duplicate accounting, latency summaries, and a
//! non-blocking (optionally TLS) frame connection for `mio`.

pub mod accounting;
pub mod conn;
pub mod latency;
pub mod stamp;
pub mod tls;
