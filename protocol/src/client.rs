//! A small blocking Chime client over `std::net` and rustls.
//!
//! Native clients, the `chime` CLI and the integration tests all talk to `chimed` through this one
//! type, so its behaviour is the reference for what a client must do: request ids counted from 1,
//! answering server PINGs, queueing pushes that arrive while a reply is awaited, and treating a
//! GOODBYE or EOF as the end of the connection.
//!
//! TLS is trust-on-first-use, like SSH's `known_hosts`: there is no CA check; instead the SHA-256
//! of the server's leaf certificate is exposed with [`Client::server_fingerprint`] so the caller
//! can pin it, and a pinned fingerprint that does not match fails the handshake. Handshake
//! signatures are still verified, so a pinned fingerprint really binds the connection to the
//! holder of that certificate's key.
//!
//! Only `std` is used (no unix-specific APIs), so the client builds for Windows unchanged.

pub use crate::fingerprint::{cert_fingerprint, fingerprint_hex, parse_fingerprint};
use crate::frame::{DecodeError, EncodeError, FrameDecoder, DEFAULT_MAX_FRAME};
use crate::messages::*;
use crate::types::{ErrorCode, RoomKind};
use crate::{MAGIC, PROTOCOL_VERSION};
use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Page size [`Client::members`], [`Client::list_rooms`] and [`Client::list_sessions`] ask for.
const PAGE: u32 = 500;

/// How to reach a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// `HOST:PORT` (`[v6]:PORT` for IPv6 literals).
    pub addr: String,
    /// Whether to speak TLS (the default listener) or plaintext (a `--plaintext-listen` one).
    pub tls: bool,
    /// If set, the handshake fails unless the server's leaf certificate has this SHA-256.
    pub pinned_fingerprint: Option<[u8; 32]>,
    /// Sent in `HELLO`, for the server's logs.
    pub client_name: String,
    /// Sent in `HELLO`, for the server's logs.
    pub client_version: String,
    /// Limit for connecting (TCP and TLS handshake and `HELLO`) and for each request's reply.
    pub timeout: Duration,
    /// The largest length field accepted from the server.
    pub max_frame: u32,
}

impl ConnectOptions {
    /// Options with client name `"chime"`, this crate's version, a 10 s timeout and the default
    /// maximum frame.
    pub fn new(addr: impl Into<String>, tls: bool) -> Self {
        ConnectOptions {
            addr: addr.into(),
            tls,
            pinned_fingerprint: None,
            client_name: "chime".to_string(),
            client_version: env!("CARGO_PKG_VERSION").to_string(),
            timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

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
    /// No reply within the timeout.
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

/// A connected, handshaken Chime connection.
///
/// Not thread-safe by design: one thread drives it, as with a `TcpStream`.
#[derive(Debug)]
pub struct Client {
    /// The byte stream, plain or TLS.
    transport: Transport,
    /// Splits frames off `buf`; its maximum is `ConnectOptions::max_frame`.
    decoder: FrameDecoder,
    /// Bytes read but not yet decoded into frames.
    buf: BytesMut,
    /// Frames read while waiting for something else (pushes, replies to `send`), in arrival order.
    queue: VecDeque<(u32, ServerFrame)>,
    /// The last request id handed out; ids start at 1 and skip 0 on wrap-around.
    last_id: u32,
    /// Per-request reply timeout.
    timeout: Duration,
    /// The server's answer to our `HELLO`.
    welcome: Welcome,
    /// SHA-256 of the server's leaf certificate (TLS only).
    fingerprint: Option<[u8; 32]>,
    /// Nonce for the next client `PING`.
    next_nonce: u64,
}

impl Client {
    /// Connects (TCP with `TCP_NODELAY`, then TLS if asked) and performs the `HELLO`/`WELCOME`
    /// handshake.
    pub fn connect(opts: &ConnectOptions) -> Result<Client, ClientError> {
        let deadline = Instant::now() + opts.timeout;
        let tcp = connect_tcp(&opts.addr, opts.timeout)?;
        tcp.set_nodelay(true)?;
        tcp.set_write_timeout(Some(opts.timeout.max(Duration::from_millis(1))))?;
        let (transport, fingerprint) = if opts.tls {
            let (tls, fp) = TlsTransport::handshake(tcp, opts, deadline)?;
            (Transport::Tls(Box::new(tls)), Some(fp))
        } else {
            (Transport::Plain(tcp), None)
        };
        let mut client = Client {
            transport,
            decoder: FrameDecoder::new(opts.max_frame),
            buf: BytesMut::with_capacity(16 * 1024),
            queue: VecDeque::new(),
            last_id: 0,
            timeout: opts.timeout,
            welcome: Welcome {
                protocol_version: PROTOCOL_VERSION,
                server_name: String::new(),
                server_version: String::new(),
                max_frame: DEFAULT_MAX_FRAME,
                heartbeat_secs: 0,
            },
            fingerprint,
            next_nonce: 1,
        };
        let hello = ClientFrame::Hello(Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            client_name: opts.client_name.clone(),
            client_version: opts.client_version.clone(),
        });
        let id = client.send(&hello)?;
        match client.await_reply(id, deadline) {
            Ok(ServerFrame::Welcome(w)) => {
                client.welcome = w;
                Ok(client)
            }
            Ok(other) => Err(unexpected("WELCOME", &other)),
            // A refusal is an ERROR then GOODBYE/close; the ERROR says more than the close does,
            // whatever request id the server gave it.
            Err(ClientError::Closed(g)) => Err(client.take_queued_error().unwrap_or(ClientError::Closed(g))),
            Err(e) => Err(e),
        }
    }

    /// SHA-256 of the server's leaf certificate DER, for pinning (TLS connections only).
    pub fn server_fingerprint(&self) -> Option<[u8; 32]> {
        self.fingerprint
    }

    /// The server's `WELCOME`.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Sends a frame under the next request id and returns that id. The reply is read by
    /// [`Client::recv`]. Frames longer than the server's `max_frame` are refused locally, since
    /// the server would drop the connection for them.
    pub fn send(&mut self, frame: &ClientFrame) -> Result<u32, ClientError> {
        self.last_id = match self.last_id.wrapping_add(1) {
            0 => 1,
            id => id,
        };
        let id = self.last_id;
        self.send_with_id(frame, id)?;
        Ok(id)
    }

    /// Returns the next frame from the server, reply or push, oldest first. `timeout: None`
    /// waits indefinitely; `Ok(None)` means the timeout passed with nothing to return.
    ///
    /// A server `PING` is answered and not returned; a `GOODBYE` is returned as
    /// `Err(Closed(Some(..)))` and EOF as `Err(Closed(None))`. A frame that cannot be decoded is
    /// returned as `Err(Decode(..))`; unless the error is fatal, later frames can still be read.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<(u32, ServerFrame)>, ClientError> {
        if let Some(frame) = self.queue.pop_front() {
            return Ok(Some(frame));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        self.read_frame(deadline)
    }

    /// Sends a request and waits (up to the connect options' timeout) for the reply carrying its
    /// id. Anything else that arrives meanwhile is queued for [`Client::recv`]. An `ERROR` reply
    /// becomes `Err(Server(..))`.
    ///
    /// After a `Timeout` the late reply, if it ever comes, is queued like any other frame.
    pub fn request(&mut self, frame: &ClientFrame) -> Result<ServerFrame, ClientError> {
        let id = self.send(frame)?;
        let deadline = Instant::now() + self.timeout;
        self.await_reply(id, deadline)
    }

    /// `REGISTER`: creates the account and logs in; the reply carries a session token.
    pub fn register(&mut self, user: &str, password: &str, user_agent: &str) -> Result<Authed, ClientError> {
        let creds = credentials(user, password, user_agent);
        match self.request(&ClientFrame::Register(creds))? {
            ServerFrame::Authed(a) => Ok(a),
            other => Err(unexpected("AUTHED", &other)),
        }
    }

    /// `LOGIN` with a password; the reply carries a session token.
    pub fn login(&mut self, user: &str, password: &str, user_agent: &str) -> Result<Authed, ClientError> {
        let creds = credentials(user, password, user_agent);
        match self.request(&ClientFrame::Login(creds))? {
            ServerFrame::Authed(a) => Ok(a),
            other => Err(unexpected("AUTHED", &other)),
        }
    }

    /// `RESUME`: logs in with a session token from an earlier `AUTHED`.
    pub fn resume(&mut self, token: &str, user_agent: &str) -> Result<Authed, ClientError> {
        let body = Resume { token: token.to_string(), user_agent: user_agent.to_string() };
        match self.request(&ClientFrame::Resume(body))? {
            ServerFrame::Authed(a) => Ok(a),
            other => Err(unexpected("AUTHED", &other)),
        }
    }

    /// `LOGOUT`: revokes the session token in use.
    pub fn logout(&mut self) -> Result<(), ClientError> {
        match self.request(&ClientFrame::Logout(Empty {}))? {
            ServerFrame::Done(_) => Ok(()),
            other => Err(unexpected("DONE", &other)),
        }
    }

    /// `CREATE_ROOM` for a group room; the creator becomes its owner.
    pub fn create_room(&mut self, name: &str) -> Result<RoomInfo, ClientError> {
        let body = CreateRoom { name: name.to_string(), kind: RoomKind::GROUP };
        match self.request(&ClientFrame::CreateRoom(body))? {
            ServerFrame::RoomInfo(r) => Ok(r),
            other => Err(unexpected("ROOM_INFO", &other)),
        }
    }

    /// `JOIN_ROOM`.
    pub fn join_room(&mut self, room: u64) -> Result<RoomInfo, ClientError> {
        match self.request(&ClientFrame::JoinRoom(RoomRef { room }))? {
            ServerFrame::RoomInfo(r) => Ok(r),
            other => Err(unexpected("ROOM_INFO", &other)),
        }
    }

    /// `LEAVE_ROOM`.
    pub fn leave_room(&mut self, room: u64) -> Result<(), ClientError> {
        match self.request(&ClientFrame::LeaveRoom(RoomRef { room }))? {
            ServerFrame::Done(_) => Ok(()),
            other => Err(unexpected("DONE", &other)),
        }
    }

    /// Every room the user is in, fetched with `LIST_ROOMS` pages of 500 until `next_after` is
    /// `None`.
    pub fn list_rooms(&mut self) -> Result<Vec<RoomInfo>, ClientError> {
        self.all_pages(
            "ROOM_LIST",
            |after_room| ClientFrame::ListRooms(ListRooms { after_room, limit: PAGE }),
            |f| match f {
                ServerFrame::RoomList(l) => Ok((l.rooms, l.next_after)),
                other => Err(other),
            },
        )
    }

    /// All members of a room, fetched with `LIST_MEMBERS` pages of 500 until `next_after` is
    /// `None`.
    pub fn members(&mut self, room: u64) -> Result<Vec<MemberInfo>, ClientError> {
        self.all_pages(
            "MEMBER_LIST",
            |after_user| ClientFrame::ListMembers(ListMembers { room, after_user, limit: PAGE }),
            |f| match f {
                ServerFrame::MemberList(l) => Ok((l.members, l.next_after)),
                other => Err(other),
            },
        )
    }

    /// The user's live sessions, fetched with `LIST_SESSIONS` pages of 500.
    pub fn list_sessions(&mut self) -> Result<Vec<SessionInfo>, ClientError> {
        self.all_pages(
            "SESSION_LIST",
            |after_session| ClientFrame::ListSessions(ListSessions { after_session, limit: PAGE }),
            |f| match f {
                ServerFrame::SessionList(l) => Ok((l.sessions, l.next_after)),
                other => Err(other),
            },
        )
    }

    /// `REVOKE_SESSIONS`: revokes one session of the user, or all of them with `None`; returns
    /// how many were revoked. Revoking the session in use ends this connection right after the
    /// reply (the next read returns `Closed` with GOODBYE `SESSION_REVOKED`).
    pub fn revoke_sessions(&mut self, session: Option<u64>) -> Result<u32, ClientError> {
        match self.request(&ClientFrame::RevokeSessions(RevokeSessions { session }))? {
            ServerFrame::SessionsRevoked(r) => Ok(r.count),
            other => Err(unexpected("SESSIONS_REVOKED", &other)),
        }
    }

    /// Requests pages until the reply's cursor is `None`. `request` builds the request for a
    /// cursor; `page` splits a reply into its items and next cursor (or gives the frame back when
    /// it is not the expected reply, named `what`).
    fn all_pages<T>(
        &mut self,
        what: &str,
        request: impl Fn(u64) -> ClientFrame,
        page: impl Fn(ServerFrame) -> Result<(Vec<T>, Option<u64>), ServerFrame>,
    ) -> Result<Vec<T>, ClientError> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let (items, next) = page(self.request(&request(after))?).map_err(|other| unexpected(what, &other))?;
            all.extend(items);
            match next {
                None => return Ok(all),
                // A cursor that does not move forward would make this loop forever.
                Some(next) if next <= after => {
                    return Err(ClientError::Protocol(format!(
                        "{what} next_after {next} does not advance past {after}"
                    )))
                }
                Some(next) => after = next,
            }
        }
    }

    /// `POST`: returns once the server has made the message durable. Retrying with the same
    /// `idempotency_key` (see [`new_idempotency_key`]) never posts twice.
    pub fn post(&mut self, room: u64, idempotency_key: &str, text: &str) -> Result<Posted, ClientError> {
        let body = Post { room, idempotency_key: idempotency_key.to_string(), text: text.to_string() };
        match self.request(&ClientFrame::Post(body))? {
            ServerFrame::Posted(p) => Ok(p),
            other => Err(unexpected("POSTED", &other)),
        }
    }

    /// `HISTORY`: one page of a room's deltas after `after`.
    pub fn history(&mut self, room: u64, after: u64, limit: u32) -> Result<DeltaPage, ClientError> {
        match self.request(&ClientFrame::History(History { room, after, limit }))? {
            ServerFrame::DeltaPage(p) => Ok(p),
            other => Err(unexpected("DELTA_PAGE", &other)),
        }
    }

    /// `SYNC`: streams every delta after each cursor through `on_delta`, in seq order per room,
    /// and returns the `SYNC_DONE`. `DELTA` pushes arriving meanwhile are queued for
    /// [`Client::recv`]; after `SYNC_DONE` they continue exactly where the sync stopped.
    ///
    /// The timeout applies between pages, not to the whole sync. Each delta is checked to follow
    /// the one before it in its room (starting from the cursor): a gap or a repeat is a
    /// `Protocol` error rather than silently lost or doubled messages.
    pub fn sync(
        &mut self,
        cursors: &[RoomCursor],
        page_size: u32,
        on_delta: &mut dyn FnMut(&Delta),
    ) -> Result<SyncDone, ClientError> {
        let mut last: HashMap<u64, u64> = cursors.iter().map(|c| (c.room, c.seq)).collect();
        let id = self.send(&ClientFrame::Sync(Sync { rooms: cursors.to_vec(), page_size }))?;
        loop {
            let deadline = Instant::now() + self.timeout;
            match self.await_reply(id, deadline)? {
                ServerFrame::DeltaPage(page) => {
                    for delta in &page.deltas {
                        check_follows(&mut last, page.room, delta)?;
                        on_delta(delta);
                    }
                }
                ServerFrame::SyncDone(done) => return Ok(done),
                other => return Err(unexpected("DELTA_PAGE or SYNC_DONE", &other)),
            }
        }
    }

    /// `PING`: measures one round trip.
    pub fn ping(&mut self) -> Result<Duration, ClientError> {
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        let start = Instant::now();
        match self.request(&ClientFrame::Ping(Ping { nonce }))? {
            ServerFrame::Pong(p) if p.nonce == nonce => Ok(start.elapsed()),
            ServerFrame::Pong(p) => {
                Err(ClientError::Protocol(format!("PONG echoed nonce {} instead of {nonce}", p.nonce)))
            }
            other => Err(unexpected("PONG", &other)),
        }
    }

    /// Removes and returns the first queued `ERROR`, as a `Server` error.
    fn take_queued_error(&mut self) -> Option<ClientError> {
        let pos = self.queue.iter().position(|(_, f)| matches!(f, ServerFrame::Error(_)))?;
        match self.queue.remove(pos) {
            Some((_, ServerFrame::Error(e))) => Some(ClientError::Server(e)),
            _ => None,
        }
    }

    /// Encodes and writes one frame under a given id.
    fn send_with_id(&mut self, frame: &ClientFrame, id: u32) -> Result<(), ClientError> {
        let bytes = frame.encode(id)?;
        let len = bytes.len() - 4;
        if len > self.welcome.max_frame as usize {
            return Err(ClientError::Protocol(format!(
                "{} frame of {len} bytes exceeds the server's maximum of {}",
                frame.frame_type(),
                self.welcome.max_frame
            )));
        }
        self.transport.write_all(&bytes).map_err(io_error)
    }

    /// Reads until the reply with request id `id` arrives, queueing everything else.
    fn await_reply(&mut self, id: u32, deadline: Instant) -> Result<ServerFrame, ClientError> {
        loop {
            match self.read_frame(Some(deadline))? {
                None => return Err(ClientError::Timeout),
                Some((rid, frame)) if rid == id && !frame.frame_type().is_push() => {
                    return match frame {
                        ServerFrame::Error(e) => Err(ClientError::Server(e)),
                        other => Ok(other),
                    };
                }
                Some(other) => self.queue.push_back(other),
            }
        }
    }

    /// Reads the next frame off the wire, answering PINGs. `Ok(None)` once `deadline` passes.
    fn read_frame(&mut self, deadline: Option<Instant>) -> Result<Option<(u32, ServerFrame)>, ClientError> {
        // Even an expired deadline gets one short read, so `recv(Some(Duration::ZERO))` polls.
        let mut first_read = true;
        loop {
            if let Some(raw) = self.decoder.decode(&mut self.buf)? {
                match ServerFrame::decode(&raw)? {
                    // The PONG echoes the PING's request id (servers send 0) and nonce.
                    ServerFrame::Ping(p) => self.send_with_id(&ClientFrame::Pong(p), raw.request_id)?,
                    ServerFrame::Goodbye(g) => return Err(ClientError::Closed(Some(g))),
                    frame => return Ok(Some((raw.request_id, frame))),
                }
                continue;
            }
            let timeout = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ if first_read => Some(Duration::from_millis(1)),
                    _ => return Ok(None),
                },
            };
            first_read = false;
            if let Some(needed) = self.decoder.needed(&self.buf) {
                self.buf.reserve(needed.saturating_sub(self.buf.len()));
            }
            match self.transport.read_into(&mut self.buf, timeout) {
                Ok(0) => return Err(ClientError::Closed(None)),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
    }
}

/// A fresh idempotency key for [`Client::post`]: 128 random bits as 32 lower-case hex characters.
pub fn new_idempotency_key() -> String {
    let mut bytes = [0u8; 16];
    if rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).is_err() {
        // The OS refused randomness (practically never). A key only has to be unique per room,
        // so time, process and a counter, hashed, are a safe substitute; panicking is not.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = Sha256::new();
        h.update(format!("{:?}", std::time::SystemTime::now()));
        h.update(std::process::id().to_le_bytes());
        h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        bytes.copy_from_slice(&h.finalize()[..16]);
    }
    hex::encode(bytes)
}

fn credentials(user: &str, password: &str, user_agent: &str) -> Credentials {
    Credentials { user: user.to_string(), password: password.to_string(), user_agent: user_agent.to_string() }
}

fn unexpected(wanted: &str, got: &ServerFrame) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {}", got.frame_type()))
}

/// Checks that `delta` is the next one in its room after the last one seen.
fn check_follows(last: &mut HashMap<u64, u64>, page_room: u64, delta: &Delta) -> Result<(), ClientError> {
    if delta.room != page_room {
        return Err(ClientError::Protocol(format!(
            "DELTA_PAGE for room {page_room} holds a delta of room {}",
            delta.room
        )));
    }
    if let Some(prev) = last.get(&delta.room) {
        if delta.seq != prev.wrapping_add(1) {
            return Err(ClientError::Protocol(format!(
                "room {} delta seq {} does not follow {prev}",
                delta.room, delta.seq
            )));
        }
    }
    last.insert(delta.room, delta.seq);
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    // Unix reports an expired socket timeout as WouldBlock, Windows as TimedOut.
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn io_error(e: io::Error) -> ClientError {
    if is_timeout(&e) {
        ClientError::Timeout
    } else if matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    ) {
        ClientError::Closed(None)
    } else {
        ClientError::Io(e)
    }
}

/// Resolves `addr` and connects to the first address that answers.
fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream, ClientError> {
    let mut last_err = None;
    for sa in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sa, timeout.max(Duration::from_millis(1))) {
            Ok(s) => return Ok(s),
            Err(e) => last_err = Some(e),
        }
    }
    Err(match last_err {
        Some(e) => io_error(e),
        None => ClientError::Io(io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no addresses"))),
    })
}

/// The server name for TLS: the host part of `addr` (a DNS name or an IP literal), else the IP
/// actually connected to.
fn server_name(addr: &str, peer: SocketAddr) -> ServerName<'static> {
    let host = match addr.rsplit_once(':') {
        Some((h, _port)) => h,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match ServerName::try_from(host.to_string()) {
        Ok(name) => name,
        Err(_) => ServerName::from(peer.ip()),
    }
}

/// Either transport, with one read/write interface.
#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsTransport>),
}

impl Transport {
    /// Appends whatever arrives within `timeout` to `buf`; `Ok(0)` means EOF.
    fn read_into(&mut self, buf: &mut BytesMut, timeout: Option<Duration>) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = match self {
            Transport::Plain(tcp) => {
                tcp.set_read_timeout(timeout)?;
                read_retrying(tcp, &mut chunk)?
            }
            Transport::Tls(tls) => tls.read(&mut chunk, timeout)?,
        };
        buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(tcp) => {
                tcp.write_all(bytes)?;
                tcp.flush()
            }
            Transport::Tls(tls) => tls.write_all(bytes),
        }
    }
}

fn read_retrying(r: &mut impl Read, chunk: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(chunk) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A rustls client connection driven by hand over a blocking socket, so that read timeouts
/// apply to each socket read and a timeout never loses buffered TLS records.
#[derive(Debug)]
struct TlsTransport {
    conn: ClientConnection,
    tcp: TcpStream,
}

impl TlsTransport {
    /// Runs the TLS handshake to completion and returns the leaf certificate's fingerprint.
    fn handshake(
        tcp: TcpStream,
        opts: &ConnectOptions,
        deadline: Instant,
    ) -> Result<(TlsTransport, [u8; 32]), ClientError> {
        let (config, verifier) = tofu_client_config(opts.pinned_fingerprint)?;
        let name = server_name(&opts.addr, tcp.peer_addr()?);
        let conn = ClientConnection::new(config, name).map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut tls = TlsTransport { conn, tcp };
        let result = tls.drive_handshake(deadline);
        let seen = verifier.get();
        if let (Some(expected), Some(got)) = (opts.pinned_fingerprint, seen) {
            if expected != got {
                return Err(ClientError::FingerprintMismatch {
                    expected: fingerprint_hex(&expected),
                    got: fingerprint_hex(&got),
                });
            }
        }
        result?;
        match seen {
            Some(fp) => Ok((tls, fp)),
            None => Err(ClientError::Tls("handshake finished without a server certificate".to_string())),
        }
    }

    fn drive_handshake(&mut self, deadline: Instant) -> Result<(), ClientError> {
        while self.conn.is_handshaking() {
            if self.conn.wants_write() {
                self.flush_tls().map_err(io_error)?;
                continue;
            }
            let left =
                deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or(ClientError::Timeout)?;
            self.tcp.set_read_timeout(Some(left))?;
            match self.conn.read_tls(&mut self.tcp) {
                Ok(0) => return Err(ClientError::Closed(None)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => continue,
                Err(e) => return Err(io_error(e)),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // Let the server see the alert rustls queued, then report the real cause.
                let _ = self.flush_tls();
                return Err(ClientError::Tls(e.to_string()));
            }
        }
        // TLS 1.3: the client's Finished is queued as the handshake completes.
        self.flush_tls().map_err(io_error)
    }

    fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.tcp)?;
        }
        self.tcp.flush()
    }

    fn read(&mut self, chunk: &mut [u8], timeout: Option<Duration>) -> io::Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match self.conn.reader().read(chunk) {
                Ok(n) => return Ok(n),
                // The peer closed the socket without close_notify: EOF all the same for us.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let left = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out")),
                },
            };
            self.tcp.set_read_timeout(left)?;
            match self.conn.read_tls(&mut self.tcp) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                let _ = self.flush_tls();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Key updates and alerts may need answering.
            self.flush_tls()?;
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        // rustls buffers a bounded amount (64 KiB by default) and accepts less than offered when
        // full, so a large frame goes in pieces, draining to the socket between them.
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = self.conn.writer().write(rest)?;
            rest = &rest[n..];
            self.flush_tls()?;
        }
        Ok(())
    }
}

/// The fingerprint a TLS server presented, as recorded by the verifier of a
/// [`tofu_client_config`].
#[derive(Debug, Clone)]
pub struct SeenFingerprint(Arc<TofuVerifier>);

impl SeenFingerprint {
    /// SHA-256 of the server's leaf certificate, once a handshake has reached verification.
    pub fn get(&self) -> Option<[u8; 32]> {
        self.0.seen()
    }
}

/// A rustls client configuration that trusts on first use, as `chime` does: with `pinned`, only
/// the certificate with that SHA-256 is accepted; without, any certificate is, and the returned
/// [`SeenFingerprint`] tells which one to pin. Handshake signatures are always verified, so the
/// server proves it holds the certificate's key. For clients that drive rustls themselves (the
/// load generator's non-blocking connections); [`Client::connect`] uses it too.
pub fn tofu_client_config(pinned: Option<[u8; 32]>) -> Result<(Arc<ClientConfig>, SeenFingerprint), ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        Arc::new(TofuVerifier { pinned, seen: Mutex::new(None), algs: provider.signature_verification_algorithms });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    Ok((Arc::new(config), SeenFingerprint(verifier)))
}

/// Trust-on-first-use certificate verification: any certificate is accepted unless a pinned
/// fingerprint says otherwise, but handshake signatures are checked for real.
#[derive(Debug)]
struct TofuVerifier {
    /// The fingerprint the caller expects, if it has seen this server before.
    pinned: Option<[u8; 32]>,
    /// The fingerprint the server presented.
    seen: Mutex<Option<[u8; 32]>>,
    /// The provider's signature algorithms.
    algs: WebPkiSupportedAlgorithms,
}

impl TofuVerifier {
    fn seen(&self) -> Option<[u8; 32]> {
        // A poisoned lock only means another thread panicked mid-store of a Copy value.
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ServerCertVerifier for TofuVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = cert_fingerprint(end_entity);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
        match self.pinned {
            Some(pinned) if pinned != fp => {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn server_name_from_addr() {
        let peer: SocketAddr = ([127, 0, 0, 1], 7878).into();
        assert_eq!(server_name("localhost:7878", peer), ServerName::try_from("localhost").unwrap());
        assert_eq!(server_name("[::1]:7878", peer), ServerName::from("::1".parse::<IpAddr>().unwrap()));
        assert_eq!(server_name("10.0.0.1:1", peer), ServerName::from(IpAddr::from([10, 0, 0, 1])));
        assert_eq!(server_name("bad_name!:1", peer), ServerName::from(peer.ip()));
    }

    #[test]
    fn idempotency_keys_are_fresh_hex() {
        let a = new_idempotency_key();
        let b = new_idempotency_key();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn sync_gap_is_detected() {
        let mut last = HashMap::from([(1u64, 5u64)]);
        let d = |seq| Delta {
            room: 1,
            seq,
            kind: crate::DeltaKind::MESSAGE,
            author_id: 1,
            author: "a".into(),
            ts_ms: 0,
            text: String::new(),
        };
        assert!(check_follows(&mut last, 1, &d(6)).is_ok());
        assert!(matches!(check_follows(&mut last, 1, &d(8)), Err(ClientError::Protocol(_))));
        assert!(matches!(check_follows(&mut last, 1, &d(6)), Err(ClientError::Protocol(_))));
        assert!(matches!(check_follows(&mut last, 2, &d(7)), Err(ClientError::Protocol(_))));
    }
}
