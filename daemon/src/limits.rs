//! Every fixed limit of the daemon, named once. The configurable ones live in [`crate::config`];
//! the ones a client must plan for (frame size, text and name lengths, requests in flight, page
//! sizes, heartbeat) are also announced to every client in `WELCOME` and listed in
//! docs/protocol.md.

use chime_protocol::Limits;
use std::time::Duration;

// --- What a client sends ---

/// Longest message text, in bytes.
pub const MAX_TEXT: usize = 16 * 1024;
/// Longest idempotency key, in bytes.
pub const MAX_KEY: usize = 64;
/// Longest reaction, in bytes: one emoji, however many code points it is made of.
pub const MAX_EMOJI: usize = 32;
/// Longest room name, in characters (after trimming).
pub const MAX_ROOM_NAME: usize = 100;
/// Longest user name, in characters (all of them ASCII).
pub const MAX_USER_NAME: usize = 32;
/// Shortest password accepted at registration, in bytes.
pub const MIN_PASSWORD: usize = 8;
/// Longest password, in bytes: bounds the work one login can cause.
pub const MAX_PASSWORD: usize = 1024;
/// Longest email address, in bytes (the longest path SMTP carries, RFC 5321, less its brackets).
pub const MAX_EMAIL: usize = 254;
/// Longest display name, in characters (after trimming).
pub const MAX_DISPLAY_NAME: usize = 64;
/// Longest user agent kept with a session, in characters (longer ones are cut).
pub const MAX_USER_AGENT: usize = 256;
/// Most rooms in one SYNC.
pub const MAX_SYNC_ROOMS: usize = 1000;

// --- Pages ---

/// The page size used when a client asks for 0 (SYNC, HISTORY, lists).
pub const DEFAULT_PAGE: u32 = 500;
/// The largest page; a client asking for more gets this many.
pub const MAX_PAGE: u32 = 1000;
/// Upper bound on the text bytes in one page of deltas, so that a page of long messages stays
/// far below the largest frame.
pub const PAGE_TEXT_BUDGET: usize = 256 * 1024;

// --- One connection's share ---

/// Requests one connection may have with the workers at once; past it, its frames wait in its
/// read buffer (and reading pauses), which is how a pipelining client gets backpressure.
pub const MAX_IN_FLIGHT: u32 = 256;
/// Of those, jobs one connection may have on the shared queue at once (reads, SYNC pages):
/// every connection's reads wait in that one queue, so a connection's share of it is a small
/// window, and queue order between busy connections becomes round robin.
pub const SHARED_WINDOW: u32 = 4;
/// Frames a client may send behind a login that is still being checked; they are run, in order,
/// once it is (the rest wait unread in the socket).
pub const MAX_QUEUED_DURING_LOGIN: usize = 64;
/// A connection whose outbound queue costs more than this share of `max_outbound_bytes` is not
/// read until it drains to a quarter: replies it does not read stop it from asking for more.
pub const READ_PAUSE_DIVISOR: usize = 2;
/// Pushes held per catching-up room before further ones are dropped (and fetched again later).
pub const HELD_CAP: usize = 4096;
/// Bytes of pushes one connection holds across all its catching-up rooms before further ones are
/// dropped (and fetched again later). Held pushes are shared with other recipients, but a
/// connection holding them keeps them alive.
pub const HELD_BYTES: usize = 1 << 20;

// --- Time ---

/// Seconds a connection may take to complete the TLS and Chime handshakes.
pub const HANDSHAKE_SECS: u32 = 10;
/// Between graceful-shutdown start and the forced close of whatever is left.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
/// Seconds between records of "still in use" for the sessions of connections that stay open, so
/// a session connected for weeks is not idle-expired if the daemon is killed before it closes.
pub const TOUCH_LIVE_EVERY: u32 = 3600;

// --- The whole server ---

/// Queues costing at most this are never cut off by the server-wide budget: the budget goes
/// after the connections that hold the most.
pub const FAIR_SHARE: usize = 64 * 1024;
/// Give freed heap back to the OS once this much outbound memory was released since last time.
pub const TRIM_AFTER: usize = 16 << 20;

/// The limits announced in `WELCOME`: these constants, and the configured frame size and
/// heartbeat.
pub fn announced(max_frame: u32, heartbeat_secs: u32) -> Limits {
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    Limits {
        max_frame,
        heartbeat_secs,
        max_text: n(MAX_TEXT),
        max_key: n(MAX_KEY),
        max_room_name: n(MAX_ROOM_NAME),
        max_user_name: n(MAX_USER_NAME),
        min_password: n(MIN_PASSWORD),
        max_password: n(MAX_PASSWORD),
        max_in_flight: MAX_IN_FLIGHT,
        max_queued_during_login: n(MAX_QUEUED_DURING_LOGIN),
        default_page: DEFAULT_PAGE,
        max_page: MAX_PAGE,
        max_sync_rooms: n(MAX_SYNC_ROOMS),
    }
}

#[cfg(test)]
mod tests {
    /// `chime_protocol::Limits::default()` states the reference server's limits for clients and
    /// tests; it must stay what this daemon announces with its default configuration.
    #[test]
    fn the_protocols_reference_limits_are_what_the_daemon_announces_by_default() {
        let config = crate::config::Config::default();
        let announced = super::announced(config.max_frame, config.heartbeat_secs);
        assert_eq!(announced, chime_protocol::Limits::default());
    }
}
