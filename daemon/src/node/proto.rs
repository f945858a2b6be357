//! The storage-node protocol: the frames `chimed node` (the agent) and the daemon's
//! [`NodeLink`](super::link::NodeLink) exchange over SSH's stdin and stdout.
//!
//! Every frame is a 9-byte header, `u32` length (of everything after the length field), `u8`
//! type, `u32` id, then a body of fixed-width big-endian fields; [docs/nodes.md] gives every
//! frame byte for byte. The id names the request or transfer the frame belongs to, so several
//! transfers share one session with their chunks interleaved; id 0 is the session's own (HELLO,
//! WELCOME and errors that end the session).
//!
//! The format is written by hand rather than with postcard: most bytes on this wire are raw file
//! chunks that gain nothing from serde, fixed-width fields let the documentation give byte offsets,
//! and an agent on a node may be an older build than the daemon talking to it, so the format must
//! not move when a derive changes. Client frames have types below 0x80; an agent frame answering
//! request type `T` is `0x80 | T`, so a hex dump shows which way a frame went.
//!
//! Decoding is in two steps, as in the chat protocol: [`read_frame`] refuses a length over
//! [`MAX_FRAME`] before buffering anything and returns the raw frame; [`Request::decode`] and
//! [`Reply::decode`] then parse the body, rejecting trailing bytes. Unknown types decode to an
//! error that carries the type; nothing here panics on peer input.
//!
//! [docs/nodes.md]: https://github.com/chime/chime/blob/main/docs/nodes.md

use sha2::Digest;
use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

/// The first bytes of HELLO and WELCOME: a node's stdout that starts with anything else is not
/// a Chime agent (a login shell that prints a banner, a wrong `agent` command).
pub const MAGIC: [u8; 8] = *b"CHIMENOD";

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;

/// Bytes of the frame header: length (4), type (1), id (4).
pub const HEADER_LEN: usize = 9;

/// What the length field counts besides the body: the type and the id.
const LENGTH_OVERHEAD: u32 = 5;

/// Largest DATA chunk. 256 KiB keeps a transfer's in-flight data small and lets a small request
/// slip in between two chunks of a big transfer within a few milliseconds, while the per-frame
/// cost stays negligible.
pub const MAX_CHUNK: usize = 256 << 10;

/// Largest value of the length field: one full chunk plus room for any other frame (the largest,
/// a LIST page of [`MAX_LIST_PAGE`] entries, is about 40 KiB).
pub const MAX_FRAME: u32 = (MAX_CHUNK + (8 << 10)) as u32;

/// Chunks of credit the agent offers per transfer (its WELCOME says so; the link honours what it
/// says). 8 x 256 KiB = 2 MiB in flight per transfer covers the bandwidth-delay product of a
/// loopback or LAN path; the agent's memory for transfers is bounded by
/// `MAX_TRANSFERS x WINDOW x MAX_CHUNK`.
pub const WINDOW: u32 = 8;

/// Transfers (PUT, GET, VERIFY) one session may have open at once.
pub const MAX_TRANSFERS: u32 = 16;

/// Most entries in one LIST page.
pub const MAX_LIST_PAGE: u32 = 1024;

/// Longest text field (messages, names), in bytes of UTF-8.
pub const MAX_TEXT: usize = 1024;

/// GET length meaning "to the end of the object".
pub const TO_END: u64 = u64::MAX;

/// Defines a wire code: a newtype over an integer with named constants. An unknown value still
/// decodes, keeps its value, and prints as hex, so a newer peer's code never panics an older one.
macro_rules! wire_code {
    ($(#[$meta:meta])* $name:ident($int:ty) { $($(#[$cmeta:meta])* $konst:ident = $val:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $int);

        impl $name {
            $($(#[$cmeta])* pub const $konst: $name = $name($val);)*

            /// The constant's name, or `None` for a code this build does not know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($konst)),)*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => write!(f, "{}::{}", stringify!($name), n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{:#x}", self.0),
                }
            }
        }
    };
}

wire_code! {
    /// A frame's type byte. Client frames are below 0x80; the agent's answer to type `T` is
    /// `0x80 | T`.
    FrameType(u8) {
        /// Client: opens the session (magic, version).
        HELLO = 0x01,
        /// Client: starts storing an object (sha256, size).
        PUT = 0x02,
        /// Client: a chunk of a PUT.
        DATA = 0x03,
        /// Client: the PUT's data is complete.
        END = 0x04,
        /// Client: reads a range of an object.
        GET = 0x05,
        /// Client: grants the agent more chunks of a GET.
        CREDIT = 0x06,
        /// Client: abandons a transfer.
        CANCEL = 0x07,
        /// Client: asks whether an object is stored, and its size.
        STAT = 0x08,
        /// Client: removes an object.
        DELETE = 0x09,
        /// Client: asks for the node's space.
        SPACE = 0x0a,
        /// Client: asks for a page of the stored objects.
        LIST = 0x0b,
        /// Client: re-hashes one object or all of them.
        VERIFY = 0x0c,
        /// Agent: accepts the session (magic, version, limits, node info).
        WELCOME = 0x81,
        /// Agent: a PUT is durably stored (or was already).
        STORED = 0x82,
        /// Agent: a chunk of a GET.
        AGENT_DATA = 0x83,
        /// Agent: the GET's data is complete.
        AGENT_END = 0x84,
        /// Agent: a GET's object is open (object size, bytes that will follow).
        OPENED = 0x85,
        /// Agent: grants the client more chunks of a PUT.
        AGENT_CREDIT = 0x86,
        /// Agent: answers STAT.
        OBJECT = 0x88,
        /// Agent: answers DELETE.
        DELETED = 0x89,
        /// Agent: answers SPACE.
        USAGE = 0x8a,
        /// Agent: answers LIST.
        PAGE = 0x8b,
        /// Agent: a VERIFY is complete (objects checked, bad ones).
        VERIFIED = 0x8c,
        /// Agent: a VERIFY is still running (sent about once a second).
        PROGRESS = 0x8d,
        /// Agent: VERIFY found a bad object.
        BAD = 0x8e,
        /// Agent: a request failed (or, with id 0, the session is ending).
        ERROR = 0xff,
    }
}

wire_code! {
    /// Why the agent refused a request (ERROR frames).
    ErrorCode(u16) {
        /// A body did not parse (wrong length, bad flag, invalid UTF-8, id 0 for a request).
        MALFORMED = 1,
        /// A frame type the agent does not know.
        UNKNOWN_TYPE = 2,
        /// The session did not start with a valid HELLO, or sent a second one.
        HANDSHAKE = 3,
        /// The client speaks a protocol version the agent does not.
        VERSION = 4,
        /// A length field over the maximum; the session ends (the stream cannot be resynchronized).
        TOO_LARGE = 5,
        /// Too many transfers open on the session; retry when one ends.
        BUSY = 6,
        /// The id is already in use by an open transfer.
        DUPLICATE_ID = 7,
        /// No object with that hash.
        NOT_FOUND = 8,
        /// The data of a PUT does not hash to the announced sha256; nothing was stored.
        MISMATCH = 9,
        /// A PUT's data was longer or shorter than announced; nothing was stored.
        SIZE = 10,
        /// The node's filesystem has no room for the object.
        NO_SPACE = 11,
        /// The node failed to read or write its disk.
        IO = 12,
        /// A GET's offset is past the end of the object.
        RANGE = 13,
        /// More chunks sent (or more credit granted) than the window allows, or a frame that
        /// does not belong in this transfer.
        FLOW = 14,
    }
}

impl ErrorCode {
    /// Whether trying again (later, or on another node) can succeed: the node was busy, short of
    /// space, or its disk failed. The rest say the request itself was wrong.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::BUSY | ErrorCode::IO | ErrorCode::NO_SPACE)
    }
}

wire_code! {
    /// What is wrong with an object VERIFY reports.
    BadKind(u8) {
        /// Its content does not hash to its name; the detail holds the hash it has.
        MISMATCH = 1,
        /// It could not be read; the detail holds the OS error.
        UNREADABLE = 2,
    }
}

/// A SHA-256 digest: the name of a stored object.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// The digest of `bytes`.
    pub fn digest(bytes: &[u8]) -> Sha256 {
        Sha256(sha2::Sha256::digest(bytes).into())
    }

    /// The digest of everything `reader` yields, and how many bytes that was. Reads in chunks;
    /// the content is never held whole.
    pub fn of_reader(mut reader: impl Read) -> io::Result<(Sha256, u64)> {
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        Ok((Sha256(hasher.finalize().into()), total))
    }

    /// The digest and size of a file.
    pub fn of_file(path: &Path) -> io::Result<(Sha256, u64)> {
        Sha256::of_reader(std::fs::File::open(path)?)
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Option<Sha256> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(Sha256(out))
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_hex())
    }
}

impl FromStr for Sha256 {
    type Err = String;

    fn from_str(s: &str) -> Result<Sha256, String> {
        Sha256::from_hex(s).ok_or_else(|| format!("{s:?} is not a sha256 (64 hex digits)"))
    }
}

/// What the agent says about itself in WELCOME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version it speaks (the client's, or the session would have been refused).
    pub version: u16,
    /// Largest DATA chunk it sends or accepts.
    pub max_chunk: u32,
    /// Chunks of credit per transfer it grants on PUT and accepts on GET.
    pub window: u32,
    /// Transfers it allows open at once on this session.
    pub max_transfers: u32,
    /// The `chimed` version running the agent.
    pub agent_version: String,
    /// The node's host name.
    pub host: String,
    /// The object store's root directory on the node, as the agent resolved it.
    pub root: String,
}

/// A node's space, as SPACE reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Space {
    /// Bytes the stored objects take (the sum of their sizes).
    pub used: u64,
    /// Objects stored.
    pub objects: u64,
    /// Bytes still available to the agent on the root's filesystem.
    pub free: u64,
    /// Size of the root's filesystem.
    pub total: u64,
}

/// One object in a LIST page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListEntry {
    /// Its hash (and name).
    pub sha256: Sha256,
    /// Its size in bytes.
    pub size: u64,
}

/// One page of LIST: objects in ascending hash order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListPage {
    /// The objects, in ascending hash order.
    pub entries: Vec<ListEntry>,
    /// Whether more objects follow the last one.
    pub more: bool,
}

/// An object VERIFY found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadObject {
    /// The object's name.
    pub sha256: Sha256,
    /// What is wrong with it.
    pub kind: BadKind,
    /// The hash it actually has, or the OS error that kept it from being read.
    pub detail: String,
}

/// An ERROR frame's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    /// Why.
    pub code: ErrorCode,
    /// For people and logs.
    pub message: String,
}

/// A frame from the client (the daemon's link) to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Opens the session; the agent answers WELCOME or ERROR. The magic is checked by decoding.
    Hello {
        /// The client's protocol version.
        version: u16,
    },
    /// Starts a transfer that stores `size` bytes hashing to `sha256`.
    Put {
        /// What the data must hash to.
        sha256: Sha256,
        /// Exactly how many bytes will follow in DATA frames.
        size: u64,
    },
    /// A chunk of a PUT (1 to `max_chunk` bytes); spends one chunk of credit.
    Data(Vec<u8>),
    /// The PUT's data is complete.
    End,
    /// Starts a transfer that reads `length` bytes from `offset` ([`TO_END`]: all the rest).
    Get {
        /// The object.
        sha256: Sha256,
        /// First byte to send.
        offset: u64,
        /// Most bytes to send.
        length: u64,
    },
    /// Grants the agent this many more chunks of a GET.
    Credit(u32),
    /// Abandons the transfer; the agent sends nothing more for it.
    Cancel,
    /// Whether an object is stored, and its size.
    Stat(Sha256),
    /// Removes an object.
    Delete(Sha256),
    /// The node's space.
    Space,
    /// Up to `limit` objects with hashes greater than `after` (from the start when `None`).
    List {
        /// The last hash of the previous page.
        after: Option<Sha256>,
        /// Most entries wanted (the agent sends at most [`MAX_LIST_PAGE`]).
        limit: u32,
    },
    /// Re-hashes one object, or every object when `None`.
    Verify(Option<Sha256>),
}

/// A frame from the agent to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The session is open.
    Welcome(Welcome),
    /// A PUT is stored durably; `existed`: it already was, and no data was wanted.
    Stored {
        /// The object was already stored; the client sends no data.
        existed: bool,
    },
    /// A chunk of a GET; spends one chunk of the client's credit.
    Data(Vec<u8>),
    /// The GET's data is complete.
    End,
    /// A GET's object is open: its size, and how many bytes DATA will carry.
    Opened {
        /// The whole object's size.
        size: u64,
        /// The bytes that follow (the requested range, cut at the end of the object).
        length: u64,
    },
    /// Grants the client this many more chunks of a PUT.
    Credit(u32),
    /// Answers STAT: the object's size, or `None` when it is not stored.
    Object(Option<u64>),
    /// Answers DELETE: whether there was an object to delete.
    Deleted {
        /// There was an object.
        existed: bool,
    },
    /// Answers SPACE.
    Usage(Space),
    /// Answers LIST.
    Page(ListPage),
    /// A VERIFY is complete.
    Verified {
        /// Objects hashed.
        checked: u64,
        /// Objects found bad (each was reported in a BAD frame).
        bad: u64,
    },
    /// A VERIFY is still running; it keeps the client's reply timeout from firing.
    Progress {
        /// Objects hashed so far.
        checked: u64,
        /// Bytes hashed so far.
        bytes: u64,
    },
    /// VERIFY found a bad object.
    Bad(BadObject),
    /// A request failed; with id 0 the agent is ending the session.
    Error(WireError),
}

/// A frame as read off the wire, body not yet parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Its type byte.
    pub ty: FrameType,
    /// The request or transfer it belongs to (0: the session).
    pub id: u32,
    /// The body, `length - 5` bytes.
    pub body: Vec<u8>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
    /// The length field is over [`MAX_FRAME`]; `0` holds the four bytes as read, which are often
    /// the start of text someone printed on the stream.
    #[error("frame length {} is over the maximum {MAX_FRAME} (the first bytes were {:?})", u32::from_be_bytes(*.0), String::from_utf8_lossy(.0))]
    TooLarge([u8; 4]),
    /// The length field is under 5 (a frame has at least a type and an id).
    #[error("frame length {0} is under 5")]
    TooShort(u32),
}

/// Why a frame's body could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The type byte is not one this direction knows.
    #[error("unknown frame type {0}")]
    UnknownType(FrameType),
    /// The body is wrong for its type.
    #[error("malformed {ty} frame: {why}")]
    Malformed {
        /// The frame's type.
        ty: FrameType,
        /// What is wrong.
        why: &'static str,
    },
}

impl DecodeError {
    /// The error code the agent answers this with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownType(_) => ErrorCode::UNKNOWN_TYPE,
            DecodeError::Malformed { .. } => ErrorCode::MALFORMED,
        }
    }
}

/// Reads one frame. `Ok(None)` at a clean end of stream (between frames). A length over
/// [`MAX_FRAME`] is refused before anything of the body is read or allocated.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<RawFrame>, ReadError> {
    let mut length = [0u8; 4];
    let mut filled = 0;
    while filled < length.len() {
        match reader.read(&mut length[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(ReadError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(length);
    if len > MAX_FRAME {
        return Err(ReadError::TooLarge(length));
    }
    if len < LENGTH_OVERHEAD {
        return Err(ReadError::TooShort(len));
    }
    let mut head = [0u8; 5];
    read_full(reader, &mut head)?;
    let mut body = vec![0u8; (len - LENGTH_OVERHEAD) as usize];
    read_full(reader, &mut body)?;
    let id = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    Ok(Some(RawFrame { ty: FrameType(head[0]), id, body }))
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<(), ReadError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ReadError::Truncated,
        _ => ReadError::Io(e),
    })
}

/// Builds a DATA frame (`ty` is [`FrameType::DATA`] or [`FrameType::AGENT_DATA`]) whose chunk
/// `fill` writes straight into the frame's buffer, so a chunk read from a file is never copied.
/// `fill` gets `max` bytes (at most [`MAX_CHUNK`]) and returns how many it wrote; `Ok(None)` when
/// it wrote none.
pub fn data_frame(
    ty: FrameType,
    id: u32,
    max: usize,
    fill: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<Option<Vec<u8>>> {
    let max = max.min(MAX_CHUNK);
    let mut frame = vec![0u8; HEADER_LEN + max];
    let n = fill(&mut frame[HEADER_LEN..])?.min(max);
    if n == 0 {
        return Ok(None);
    }
    frame.truncate(HEADER_LEN + n);
    write_header(&mut frame, ty, id);
    Ok(Some(frame))
}

/// Reads from `reader` until `buf` is full or the reader ends; returns the bytes read. File
/// chunks are filled whole so every DATA frame but the last carries a full chunk.
pub fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn write_header(frame: &mut [u8], ty: FrameType, id: u32) {
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame[4] = ty.0;
    frame[5..9].copy_from_slice(&id.to_be_bytes());
}

/// Appends a frame's fields after a header placeholder; `finish` fills the header in.
struct Encoder {
    buf: Vec<u8>,
    ty: FrameType,
    id: u32,
}

impl Encoder {
    fn new(ty: FrameType, id: u32) -> Encoder {
        let mut buf = Vec::with_capacity(64);
        buf.resize(HEADER_LEN, 0);
        Encoder { buf, ty, id }
    }

    fn u8(mut self, v: u8) -> Self {
        self.buf.push(v);
        self
    }

    fn u16(mut self, v: u16) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn u32(mut self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn u64(mut self, v: u64) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn bytes(mut self, v: &[u8]) -> Self {
        self.buf.extend_from_slice(v);
        self
    }

    fn flag(self, v: bool) -> Self {
        self.u8(u8::from(v))
    }

    /// A text field; cut (at a character boundary) to [`MAX_TEXT`] bytes, so the encoder never
    /// writes a field the decoder refuses.
    fn text(self, v: &str) -> Self {
        let mut end = v.len().min(MAX_TEXT);
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        let v = &v[..end];
        self.u16(v.len() as u16).bytes(v.as_bytes())
    }

    fn finish(mut self) -> Vec<u8> {
        write_header(&mut self.buf, self.ty, self.id);
        self.buf
    }
}

/// Reads a body's fields in order; `end` refuses trailing bytes.
struct Body<'a> {
    rest: &'a [u8],
    ty: FrameType,
}

impl<'a> Body<'a> {
    fn new(ty: FrameType, body: &'a [u8]) -> Body<'a> {
        Body { rest: body, ty }
    }

    fn malformed<T>(&self, why: &'static str) -> Result<T, DecodeError> {
        Err(DecodeError::Malformed { ty: self.ty, why })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return self.malformed("body too short");
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn sha(&mut self) -> Result<Sha256, DecodeError> {
        Ok(Sha256(self.array()?))
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => self.malformed("a flag byte is neither 0 nor 1"),
        }
    }

    fn text(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > MAX_TEXT {
            return self.malformed("text field over 1024 bytes");
        }
        match std::str::from_utf8(self.take(len)?) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => self.malformed("text field is not UTF-8"),
        }
    }

    fn end<T>(self, value: T) -> Result<T, DecodeError> {
        if self.rest.is_empty() {
            Ok(value)
        } else {
            self.malformed("trailing bytes after the body")
        }
    }
}

/// A DATA body: 1 to [`MAX_CHUNK`] bytes, taken without a copy.
fn decode_chunk(ty: FrameType, body: Vec<u8>) -> Result<Vec<u8>, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::Malformed { ty, why: "empty DATA chunk" });
    }
    if body.len() > MAX_CHUNK {
        return Err(DecodeError::Malformed { ty, why: "DATA chunk over 256 KiB" });
    }
    Ok(body)
}

impl Request {
    /// The frame type this request is sent as.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Request::Hello { .. } => FrameType::HELLO,
            Request::Put { .. } => FrameType::PUT,
            Request::Data(_) => FrameType::DATA,
            Request::End => FrameType::END,
            Request::Get { .. } => FrameType::GET,
            Request::Credit(_) => FrameType::CREDIT,
            Request::Cancel => FrameType::CANCEL,
            Request::Stat(_) => FrameType::STAT,
            Request::Delete(_) => FrameType::DELETE,
            Request::Space => FrameType::SPACE,
            Request::List { .. } => FrameType::LIST,
            Request::Verify(_) => FrameType::VERIFY,
        }
    }

    /// The whole frame, header included. (DATA chunks read from files are built in place with
    /// [`data_frame`] instead.)
    pub fn encode(&self, id: u32) -> Vec<u8> {
        let e = Encoder::new(self.frame_type(), id);
        match self {
            Request::Hello { version } => e.bytes(&MAGIC).u16(*version),
            Request::Put { sha256, size } => e.bytes(&sha256.0).u64(*size),
            Request::Data(chunk) => e.bytes(chunk),
            Request::End | Request::Cancel | Request::Space => e,
            Request::Get { sha256, offset, length } => e.bytes(&sha256.0).u64(*offset).u64(*length),
            Request::Credit(n) => e.u32(*n),
            Request::Stat(sha256) | Request::Delete(sha256) => e.bytes(&sha256.0),
            Request::List { after, limit } => {
                e.flag(after.is_some()).bytes(&after.unwrap_or(Sha256([0; 32])).0).u32(*limit)
            }
            Request::Verify(one) => e.flag(one.is_some()).bytes(&one.unwrap_or(Sha256([0; 32])).0),
        }
        .finish()
    }

    /// Parses a frame from the client.
    pub fn decode(raw: RawFrame) -> Result<Request, DecodeError> {
        let ty = raw.ty;
        if ty == FrameType::DATA {
            return decode_chunk(ty, raw.body).map(Request::Data);
        }
        let mut b = Body::new(ty, &raw.body);
        let request = match ty {
            FrameType::HELLO => {
                if b.array::<8>()? != MAGIC {
                    return b.malformed("HELLO does not start with the magic CHIMENOD");
                }
                Request::Hello { version: b.u16()? }
            }
            FrameType::PUT => Request::Put { sha256: b.sha()?, size: b.u64()? },
            FrameType::END => Request::End,
            FrameType::GET => Request::Get { sha256: b.sha()?, offset: b.u64()?, length: b.u64()? },
            FrameType::CREDIT => match b.u32()? {
                0 => return b.malformed("CREDIT of 0 chunks"),
                n => Request::Credit(n),
            },
            FrameType::CANCEL => Request::Cancel,
            FrameType::STAT => Request::Stat(b.sha()?),
            FrameType::DELETE => Request::Delete(b.sha()?),
            FrameType::SPACE => Request::Space,
            FrameType::LIST => {
                let has_after = b.flag()?;
                let after = b.sha()?;
                Request::List { after: has_after.then_some(after), limit: b.u32()? }
            }
            FrameType::VERIFY => {
                let one = b.flag()?;
                let sha256 = b.sha()?;
                Request::Verify(one.then_some(sha256))
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        b.end(request)
    }
}

impl Reply {
    /// The frame type this reply is sent as.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Reply::Welcome(_) => FrameType::WELCOME,
            Reply::Stored { .. } => FrameType::STORED,
            Reply::Data(_) => FrameType::AGENT_DATA,
            Reply::End => FrameType::AGENT_END,
            Reply::Opened { .. } => FrameType::OPENED,
            Reply::Credit(_) => FrameType::AGENT_CREDIT,
            Reply::Object(_) => FrameType::OBJECT,
            Reply::Deleted { .. } => FrameType::DELETED,
            Reply::Usage(_) => FrameType::USAGE,
            Reply::Page(_) => FrameType::PAGE,
            Reply::Verified { .. } => FrameType::VERIFIED,
            Reply::Progress { .. } => FrameType::PROGRESS,
            Reply::Bad(_) => FrameType::BAD,
            Reply::Error(_) => FrameType::ERROR,
        }
    }

    /// The whole frame, header included. A page over [`MAX_LIST_PAGE`] entries is cut to it.
    pub fn encode(&self, id: u32) -> Vec<u8> {
        let e = Encoder::new(self.frame_type(), id);
        match self {
            Reply::Welcome(w) => e
                .bytes(&MAGIC)
                .u16(w.version)
                .u32(w.max_chunk)
                .u32(w.window)
                .u32(w.max_transfers)
                .text(&w.agent_version)
                .text(&w.host)
                .text(&w.root),
            Reply::Stored { existed } => e.flag(*existed),
            Reply::Data(chunk) => e.bytes(chunk),
            Reply::End => e,
            Reply::Opened { size, length } => e.u64(*size).u64(*length),
            Reply::Credit(n) => e.u32(*n),
            Reply::Object(size) => e.flag(size.is_some()).u64(size.unwrap_or(0)),
            Reply::Deleted { existed } => e.flag(*existed),
            Reply::Usage(s) => e.u64(s.used).u64(s.objects).u64(s.free).u64(s.total),
            Reply::Page(page) => {
                let entries = &page.entries[..page.entries.len().min(MAX_LIST_PAGE as usize)];
                let more = page.more || entries.len() < page.entries.len();
                let mut e = e.flag(more).u16(entries.len() as u16);
                for entry in entries {
                    e = e.bytes(&entry.sha256.0).u64(entry.size);
                }
                e
            }
            Reply::Verified { checked, bad } => e.u64(*checked).u64(*bad),
            Reply::Progress { checked, bytes } => e.u64(*checked).u64(*bytes),
            Reply::Bad(bad) => e.bytes(&bad.sha256.0).u8(bad.kind.0).text(&bad.detail),
            Reply::Error(err) => e.u16(err.code.0).text(&err.message),
        }
        .finish()
    }

    /// Parses a frame from the agent.
    pub fn decode(raw: RawFrame) -> Result<Reply, DecodeError> {
        let ty = raw.ty;
        if ty == FrameType::AGENT_DATA {
            return decode_chunk(ty, raw.body).map(Reply::Data);
        }
        let mut b = Body::new(ty, &raw.body);
        let reply = match ty {
            FrameType::WELCOME => {
                if b.array::<8>()? != MAGIC {
                    return b.malformed("WELCOME does not start with the magic CHIMENOD");
                }
                Reply::Welcome(Welcome {
                    version: b.u16()?,
                    max_chunk: b.u32()?,
                    window: b.u32()?,
                    max_transfers: b.u32()?,
                    agent_version: b.text()?,
                    host: b.text()?,
                    root: b.text()?,
                })
            }
            FrameType::STORED => Reply::Stored { existed: b.flag()? },
            FrameType::AGENT_END => Reply::End,
            FrameType::OPENED => Reply::Opened { size: b.u64()?, length: b.u64()? },
            FrameType::AGENT_CREDIT => match b.u32()? {
                0 => return b.malformed("CREDIT of 0 chunks"),
                n => Reply::Credit(n),
            },
            FrameType::OBJECT => {
                let present = b.flag()?;
                let size = b.u64()?;
                Reply::Object(present.then_some(size))
            }
            FrameType::DELETED => Reply::Deleted { existed: b.flag()? },
            FrameType::USAGE => {
                Reply::Usage(Space { used: b.u64()?, objects: b.u64()?, free: b.u64()?, total: b.u64()? })
            }
            FrameType::PAGE => {
                let more = b.flag()?;
                let count = b.u16()?;
                if u32::from(count) > MAX_LIST_PAGE {
                    return b.malformed("PAGE of more than 1024 entries");
                }
                let mut entries = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    entries.push(ListEntry { sha256: b.sha()?, size: b.u64()? });
                }
                Reply::Page(ListPage { entries, more })
            }
            FrameType::VERIFIED => Reply::Verified { checked: b.u64()?, bad: b.u64()? },
            FrameType::PROGRESS => Reply::Progress { checked: b.u64()?, bytes: b.u64()? },
            FrameType::BAD => Reply::Bad(BadObject { sha256: b.sha()?, kind: BadKind(b.u8()?), detail: b.text()? }),
            FrameType::ERROR => Reply::Error(WireError { code: ErrorCode(b.u16()?), message: b.text()? }),
            other => return Err(DecodeError::UnknownType(other)),
        };
        b.end(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(frame: &[u8]) -> RawFrame {
        read_frame(&mut &frame[..]).expect("reads").expect("a frame")
    }

    fn sha(byte: u8) -> Sha256 {
        Sha256([byte; 32])
    }

    fn every_request() -> Vec<Request> {
        vec![
            Request::Hello { version: VERSION },
            Request::Put { sha256: sha(1), size: 1 << 40 },
            Request::Data(vec![7; 100]),
            Request::Data(vec![8; MAX_CHUNK]),
            Request::End,
            Request::Get { sha256: sha(2), offset: 5, length: TO_END },
            Request::Credit(3),
            Request::Cancel,
            Request::Stat(sha(3)),
            Request::Delete(sha(4)),
            Request::Space,
            Request::List { after: None, limit: 10 },
            Request::List { after: Some(sha(5)), limit: MAX_LIST_PAGE },
            Request::Verify(None),
            Request::Verify(Some(sha(6))),
        ]
    }

    fn every_reply() -> Vec<Reply> {
        vec![
            Reply::Welcome(Welcome {
                version: VERSION,
                max_chunk: MAX_CHUNK as u32,
                window: WINDOW,
                max_transfers: MAX_TRANSFERS,
                agent_version: "0.1.0".into(),
                host: "n\u{e9}ud".into(),
                root: "/srv/chime".into(),
            }),
            Reply::Stored { existed: true },
            Reply::Data(vec![1, 2, 3]),
            Reply::End,
            Reply::Opened { size: 10, length: 4 },
            Reply::Credit(WINDOW),
            Reply::Object(None),
            Reply::Object(Some(0)),
            Reply::Deleted { existed: false },
            Reply::Usage(Space { used: 1, objects: 2, free: 3, total: 4 }),
            Reply::Page(ListPage { entries: vec![], more: false }),
            Reply::Page(ListPage {
                entries: vec![ListEntry { sha256: sha(9), size: 1 }, ListEntry { sha256: sha(10), size: 2 }],
                more: true,
            }),
            Reply::Verified { checked: 5, bad: 1 },
            Reply::Progress { checked: 4, bytes: 1 << 33 },
            Reply::Bad(BadObject { sha256: sha(11), kind: BadKind::MISMATCH, detail: "ab".repeat(32) }),
            Reply::Error(WireError { code: ErrorCode::NOT_FOUND, message: "no such object".into() }),
            Reply::Error(WireError { code: ErrorCode(999), message: String::new() }),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for (i, request) in every_request().into_iter().enumerate() {
            let id = i as u32 + 1;
            let frame = raw(&request.encode(id));
            assert_eq!((frame.ty, frame.id), (request.frame_type(), id));
            assert_eq!(Request::decode(frame), Ok(request));
        }
        for (i, reply) in every_reply().into_iter().enumerate() {
            let id = u32::MAX - i as u32;
            let frame = raw(&reply.encode(id));
            assert_eq!((frame.ty, frame.id), (reply.frame_type(), id));
            assert_eq!(Reply::decode(frame), Ok(reply));
        }
    }

    /// Byte-exact vectors: these are the examples in docs/nodes.md.
    #[test]
    fn golden_vectors() {
        let hello = Request::Hello { version: 1 }.encode(0);
        assert_eq!(hex::encode(&hello), "0000000f01000000004348494d454e4f440001");
        let put = Request::Put { sha256: sha(0xab), size: 300 }.encode(7);
        assert_eq!(hex::encode(&put), format!("0000002d0200000007{}000000000000012c", "ab".repeat(32)));
        let data = Request::Data(b"hi".to_vec()).encode(7);
        assert_eq!(hex::encode(&data), "0000000703000000076869");
        let credit = Reply::Credit(8).encode(7);
        assert_eq!(hex::encode(&credit), "00000009860000000700000008");
        let error = Reply::Error(WireError { code: ErrorCode::MISMATCH, message: "x".into() }).encode(7);
        assert_eq!(hex::encode(&error), "0000000aff000000070009000178");
        let stored = Reply::Stored { existed: false }.encode(7);
        assert_eq!(hex::encode(&stored), "00000006820000000700");
    }

    #[test]
    fn data_frames_built_in_place_equal_encoded_ones() {
        let chunk = vec![42u8; 1000];
        let built = data_frame(FrameType::DATA, 9, MAX_CHUNK, |buf| read_up_to(&mut &chunk[..], buf))
            .expect("no I/O error")
            .expect("a frame");
        assert_eq!(built, Request::Data(chunk).encode(9));
        let none = data_frame(FrameType::DATA, 9, MAX_CHUNK, |_| Ok(0)).expect("no I/O error");
        assert_eq!(none, None);
    }

    #[test]
    fn oversized_and_undersized_lengths_are_refused_before_the_body() {
        let mut oversized = (MAX_FRAME + 1).to_be_bytes().to_vec();
        oversized.extend_from_slice(&[0; 16]);
        assert!(matches!(read_frame(&mut &oversized[..]), Err(ReadError::TooLarge(_))));
        let banner = b"Welcome to node1\n";
        let err = read_frame(&mut &banner[..]).expect_err("text is not a frame");
        assert!(err.to_string().contains("Welc"), "{err}");
        let short = 4u32.to_be_bytes();
        assert!(matches!(read_frame(&mut &short[..]), Err(ReadError::TooShort(4))));
    }

    #[test]
    fn end_of_stream_between_and_inside_frames() {
        assert!(matches!(read_frame(&mut &[][..]), Ok(None)));
        assert!(matches!(read_frame(&mut &[0, 0][..]), Err(ReadError::Truncated)));
        let mut cut = Request::Space.encode(1);
        cut.pop();
        assert!(matches!(read_frame(&mut &cut[..3]), Err(ReadError::Truncated)));
        let frame = Request::Stat(sha(1)).encode(1);
        assert!(matches!(read_frame(&mut &frame[..20]), Err(ReadError::Truncated)));
    }

    #[test]
    fn malformed_bodies_are_refused_with_their_type() {
        let cases: Vec<(u8, Vec<u8>)> = vec![
            (0x01, b"CHIMENOX\0\x01".to_vec()),                        // bad magic
            (0x02, vec![0; 39]),                                       // PUT too short
            (0x02, vec![0; 41]),                                       // PUT trailing byte
            (0x03, vec![]),                                            // empty DATA
            (0x06, vec![0, 0, 0, 0]),                                  // CREDIT 0
            (0x0b, [vec![2], vec![0; 32], vec![0, 0, 0, 1]].concat()), // LIST flag 2
            (0x0c, vec![1]),                                           // VERIFY short
        ];
        for (ty, body) in cases {
            let frame = RawFrame { ty: FrameType(ty), id: 1, body };
            let err = Request::decode(frame).expect_err("malformed");
            assert_eq!(err.code(), ErrorCode::MALFORMED, "{err}");
        }
        let unknown = RawFrame { ty: FrameType(0x42), id: 1, body: vec![] };
        assert_eq!(Request::decode(unknown), Err(DecodeError::UnknownType(FrameType(0x42))));
        // Agent frames are not client frames and the other way round.
        let welcome = RawFrame { ty: FrameType::STORED, id: 1, body: vec![0] };
        assert!(matches!(Request::decode(welcome), Err(DecodeError::UnknownType(_))));
        let hello = raw(&Request::Hello { version: 1 }.encode(0));
        assert!(matches!(Reply::decode(hello), Err(DecodeError::UnknownType(_))));
        let big = RawFrame { ty: FrameType::DATA, id: 1, body: vec![0; MAX_CHUNK + 1] };
        assert!(Request::decode(big).is_err());
        let bad_text = RawFrame { ty: FrameType::ERROR, id: 1, body: vec![0, 1, 0, 2, 0xff, 0xfe] };
        assert!(Reply::decode(bad_text).is_err());
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let message = "\u{e9}".repeat(MAX_TEXT); // two bytes each
        let frame = raw(&Reply::Error(WireError { code: ErrorCode::IO, message }).encode(1));
        let Ok(Reply::Error(err)) = Reply::decode(frame) else { panic!("an error frame") };
        assert_eq!(err.message.len(), MAX_TEXT);
    }

    #[test]
    fn codes_print_by_name_and_keep_unknown_values() {
        assert_eq!(ErrorCode::MISMATCH.to_string(), "MISMATCH");
        assert_eq!(format!("{:?}", ErrorCode(77)), "ErrorCode(0x4d)");
        assert!(ErrorCode::BUSY.is_retryable());
        assert!(!ErrorCode::MISMATCH.is_retryable());
        assert_eq!(FrameType::WELCOME.0, 0x80 | FrameType::HELLO.0);
    }

    #[test]
    fn sha256_hex_and_digests() {
        let empty = Sha256::digest(b"");
        assert_eq!(empty.to_hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(Sha256::from_hex(&empty.to_hex().to_uppercase()), Some(empty));
        assert_eq!(Sha256::from_hex("abc"), None);
        assert_eq!(Sha256::of_reader(&b"hello"[..]).expect("reads"), (Sha256::digest(b"hello"), 5));
        assert!("zz".parse::<Sha256>().is_err());
    }
}
