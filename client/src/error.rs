//! [`ClientError`]: why a driver's operation failed, shared by [`crate::blocking`] and
//! [`crate::nonblocking`].
//!
//! Protocol-level trouble comes from the session as a [`SessionError`] and converts into the
//! matching variant; socket and TLS trouble is the drivers' own. [`ClientError::is_retryable`]
//! carries the server's `retryable` flag through, so a caller decides once whether to back off and
//! try again.

use crate::session::SessionError;
use chime_protocol::{DecodeError, EncodeError, ErrorBody, ErrorCode, Goodbye};
use std::io;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket error.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The TLS layer refused the connection (bad handshake, bad signature, alert).
    #[error("TLS error: {0}")]
    Tls(String),
    /// The server's certificate is not the one pinned for it.
    #[error("server certificate fingerprint mismatch: expected {expected}, got {got}")]
    FingerprintMismatch {
        /// The pinned fingerprint, hex.
        expected: String,
        /// The fingerprint the server presented, hex.
        got: String,
    },
    /// The server sent bytes that are not a valid frame.
    #[error("undecodable frame from server: {0}")]
    Decode(#[from] DecodeError),
    /// The request would not fit in one frame (a text too long, say); nothing was sent.
    #[error("request not sent: {0}")]
    Encode(#[from] EncodeError),
    /// The server answered the request with an `ERROR`.
    #[error("server error: {0}")]
    Server(ErrorBody),
    /// The server closed the connection, with its `GOODBYE` if it sent one.
    #[error("connection closed by server{}", .0.as_ref().map(|g| format!(": {} ({})", g.message, g.code)).unwrap_or_default())]
    Closed(Option<Goodbye>),
    /// No reply within the timeout, or nothing at all heard from the server for three heartbeat
    /// intervals.
    #[error("timed out waiting for the server")]
    Timeout,
    /// The server sent something the protocol does not allow here (wrong reply type, a gap).
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether the same operation may succeed if retried, on this connection or a new one.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Io(_) | ClientError::Closed(_) | ClientError::Timeout => true,
            ClientError::Server(e) => e.retryable,
            ClientError::Tls(_)
            | ClientError::FingerprintMismatch { .. }
            | ClientError::Decode(_)
            | ClientError::Encode(_)
            | ClientError::Protocol(_) => false,
        }
    }

    /// The server's error code, if this is an `ERROR` reply.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }
}

impl From<SessionError> for ClientError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Decode(e) => ClientError::Decode(e),
            SessionError::Encode(e) => ClientError::Encode(e),
            SessionError::Protocol(why) => ClientError::Protocol(why),
            SessionError::Closed(goodbye) => ClientError::Closed(goodbye),
            SessionError::Silent(_) => ClientError::Timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_follows_the_kind_and_the_servers_flag() {
        assert!(ClientError::Timeout.is_retryable());
        assert!(ClientError::Closed(None).is_retryable());
        assert!(!ClientError::Protocol("x".into()).is_retryable());
        let limited = ClientError::Server(ErrorBody::new(ErrorCode::RATE_LIMITED, "slow down"));
        assert!(limited.is_retryable());
        assert_eq!(limited.server_code(), Some(ErrorCode::RATE_LIMITED));
        assert!(!ClientError::Server(ErrorBody::new(ErrorCode::NOT_MEMBER, "no")).is_retryable());
    }

    #[test]
    fn session_errors_map_to_their_client_kind() {
        let silent = ClientError::from(SessionError::Silent(std::time::Duration::from_secs(90)));
        assert!(matches!(silent, ClientError::Timeout));
        assert!(matches!(ClientError::from(SessionError::Closed(None)), ClientError::Closed(None)));
        let closed =
            ClientError::Closed(Some(Goodbye { code: ErrorCode::IDLE_TIMEOUT, message: "idle".into(), resync: false }));
        assert_eq!(closed.to_string(), "connection closed by server: idle (IDLE_TIMEOUT)");
    }
}
