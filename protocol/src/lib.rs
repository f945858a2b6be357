//! Chime's wire protocol, with no I/O runtime of its own.
//!
//! A Chime connection is a TCP (usually TLS) stream of length-prefixed frames. Each frame has a
//! hand-written 10-byte header (length, type code, request id; see [`frame`]) and a body that is a
//! `serde` type encoded with `postcard` (see [`messages`]). The byte-exact specification lives in
//! `docs/protocol.md`; golden frames in `protocol/tests/vectors/` pin it down.
//!
//! The crate holds no sockets, no TLS and no clock, so it can be tested in memory, fuzzed, linked
//! from C, and compiled for any target; `chime-storage` and a native client bringing its own
//! transport depend on it without pulling in rustls. [`fingerprint`] defines what a pinned server
//! certificate is. The client (a sans-I/O session, blocking and non-blocking drivers, TLS pinning)
//! is the `chime-client` crate.
#![deny(missing_docs)]

pub mod fingerprint;
pub mod frame;
pub mod messages;
pub mod types;

pub use frame::{DecodeError, EncodeError, FrameDecoder, RawFrame, DEFAULT_MAX_FRAME, HEADER_LEN, MAX_FRAME};
pub use messages::*;
pub use types::*;

/// The four bytes a client's `Hello` carries to say it speaks Chime at all.
pub const MAGIC: [u8; 4] = *b"CHIM";

/// The protocol version this crate speaks. A server refuses a `Hello` with another version with
/// [`ErrorCode::VERSION_UNSUPPORTED`], naming the versions it supports.
///
/// Version 2: `LIST_ROOMS`/`ROOM_LIST` are paged, sessions can be listed and revoked, and the
/// error codes 19-24 exist. Version 1 had an empty `LIST_ROOMS` body and one unbounded `ROOM_LIST`.
pub const PROTOCOL_VERSION: u16 = 2;
