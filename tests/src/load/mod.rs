//! Building blocks of the `chime-load` generator, kept in the library so they can be unit-tested
//! without a daemon: message stamps, loss/duplicate accounting and latency summaries. Its
//! connections are `chime-client`'s (`nonblocking::Connection` under load, the blocking `Client`
//! for setup), like every other client's.

pub mod accounting;
pub mod latency;
pub mod stamp;
