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

pub mod delta;
pub mod fingerprint;
pub mod frame;
pub mod messages;
pub mod perm;
pub mod types;

pub use frame::{DecodeError, EncodeError, FrameDecoder, RawFrame, DEFAULT_MAX_FRAME, HEADER_LEN, MAX_FRAME};
pub use messages::*;
pub use perm::{Permissions, BUILTIN_ROLES};
pub use types::*;

/// The four bytes a client's `Hello` carries to say it speaks Chime at all.
pub const MAGIC: [u8; 4] = *b"CHIM";

/// The newest protocol version this crate speaks. Client and server each state the range they
/// speak (`HELLO`, `WELCOME`) and use the newest version in both; a server refuses a client
/// whose range does not meet its own with [`ErrorCode::VERSION_UNSUPPORTED`], naming both.
///
/// Version 3: ids are typed; a delta carries its kind and a payload tagged by it
/// ([`DeltaBody`]), so unknown kinds can be skipped; `HELLO` states a range of versions and
/// `WELCOME` the server's range and its [`Limits`]; `WHOAMI`, `GET_ROOM` and the error code 25
/// (`CURSOR_AHEAD`) exist. Version 2: `LIST_ROOMS`/`ROOM_LIST` are paged, sessions can be listed
/// and revoked, and the error codes 19-24 exist. Version 1 had an empty `LIST_ROOMS` body and
/// one unbounded `ROOM_LIST`.
pub const PROTOCOL_VERSION: u16 = 3;

/// The oldest protocol version this crate speaks. Versions before 3 had no version range in
/// `HELLO` and another delta layout, so they are not spoken.
pub const MIN_PROTOCOL_VERSION: u16 = 3;
