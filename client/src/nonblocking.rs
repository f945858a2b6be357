//! A connection driven by the caller's `mio` poll loop: [`Connection`].
//!
//! The caller owns the `Poll` and the clock. It registers each connection under a token (for
//! reading and writing at once: readiness is edge-triggered, and a writable edge only comes after
//! a write that would have blocked, so the registration never needs changing), and on every event
//! for that token calls [`Connection::ready`], which reads until `WouldBlock`, hands the bytes to
//! the [`Session`] (through rustls for TLS) and writes what the session queued until `WouldBlock`.
//! Spurious wake-ups are harmless. Requests are queued with [`Connection::send`] and go out with
//! [`Connection::flush`] (or the next `ready`); what arrives comes out of
//! [`Connection::poll_event`]. The heartbeat needs [`Connection::on_tick`] by
//! [`Connection::next_tick`]; a loop with many connections may simply tick each one every second.
//!
//! `chime-load` runs thousands of these on a few threads; a full-screen client runs one next to
//! its terminal input. Nothing here blocks except [`Connection::connect`]'s TCP connect, which is
//! bounded by a timeout (a caller wanting a non-blocking connect hands a connected or connecting
//! `mio` stream to [`Connection::new`]).

use crate::error::ClientError;
use crate::session::{Event, Session, SessionConfig, Tick};
use crate::tls::{tofu_client_config, SeenFingerprint};
use chime_protocol::fingerprint::{cert_fingerprint, fingerprint_hex};
use chime_protocol::ClientFrame;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes read from the socket, or out of rustls, at a time.
const READ_CHUNK: usize = 16 * 1024;

/// How a [`Connection`] speaks TLS. One setup may serve any number of connections.
#[derive(Debug, Clone)]
pub struct TlsSetup {
    /// The rustls configuration (see [`crate::tls::tofu_client_config`]).
    pub config: Arc<ClientConfig>,
    /// The name to present (SNI); the trust-on-first-use verifier ignores it.
    pub name: ServerName<'static>,
    /// The pinned fingerprint, to tell a refused pin from other TLS failures.
    pinned: Option<[u8; 32]>,
    /// What the verifier saw, for the same purpose.
    seen: Option<SeenFingerprint>,
}

impl TlsSetup {
    /// Trust on first use: only the certificate with SHA-256 `pinned` is accepted, or any when
    /// `None` (then [`Connection::server_fingerprint`] tells which to pin).
    pub fn tofu(name: ServerName<'static>, pinned: Option<[u8; 32]>) -> Result<TlsSetup, ClientError> {
        let (config, seen) = tofu_client_config(pinned)?;
        Ok(TlsSetup { config, name, pinned, seen: Some(seen) })
    }

    /// Any rustls configuration the caller built.
    pub fn new(config: Arc<ClientConfig>, name: ServerName<'static>) -> TlsSetup {
        TlsSetup { config, name, pinned: None, seen: None }
    }
}

/// One Chime connection over a non-blocking socket; see the module doc.
#[derive(Debug)]
pub struct Connection {
    /// The socket, registered with the caller's poll.
    stream: TcpStream,
    /// The TLS state, when speaking TLS.
    tls: Option<Box<ClientConnection>>,
    /// The pin and what the verifier saw, to report a refused pin as such.
    pin: Option<([u8; 32], SeenFingerprint)>,
    /// The protocol state.
    session: Session,
}

impl Connection {
    /// The readiness to register for: both directions, once.
    pub const INTEREST: Interest = Interest::READABLE.add(Interest::WRITABLE);

    /// Connects to `addr` (blocking, bounded by `timeout`: pacing connects keeps a server's accept
    /// backlog from overflowing), with `TCP_NODELAY`, then switches the socket to non-blocking.
    /// The session's `HELLO` is queued; it goes out with the first [`Connection::flush`] or
    /// [`Connection::ready`].
    pub fn connect(
        addr: SocketAddr,
        tls: Option<&TlsSetup>,
        config: SessionConfig,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        let stream = std::net::TcpStream::connect_timeout(&addr, timeout.max(Duration::from_millis(1)))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Connection::new(TcpStream::from_std(stream), tls, config, Instant::now())
    }

    /// A connection over a non-blocking stream the caller connected (or is connecting: writes
    /// simply wait for the writable edge).
    pub fn new(
        stream: TcpStream,
        tls: Option<&TlsSetup>,
        config: SessionConfig,
        now: Instant,
    ) -> Result<Connection, ClientError> {
        let (tls, pin) = match tls {
            Some(setup) => {
                let conn = ClientConnection::new(setup.config.clone(), setup.name.clone())
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                let pin = setup.pinned.zip(setup.seen.clone());
                (Some(Box::new(conn)), pin)
            }
            None => (None, None),
        };
        Ok(Connection { stream, tls, pin, session: Session::new(config, now) })
    }

    /// Registers the socket with `registry` under `token`, for [`Connection::INTEREST`].
    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.stream, token, Self::INTEREST)
    }

    /// Removes the socket from `registry`.
    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        registry.deregister(&mut self.stream)
    }

    /// The protocol state.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The protocol state, to follow rooms and such. Frames queued through it go out with the
    /// next [`Connection::flush`].
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// SHA-256 of the server's leaf certificate, once the TLS handshake got that far.
    pub fn server_fingerprint(&self) -> Option<[u8; 32]> {
        let tls = self.tls.as_ref()?;
        tls.peer_certificates()?.first().map(|der| cert_fingerprint(der))
    }

    /// Whether the connection is over ([`Connection::ready`] said why).
    pub fn is_closed(&self) -> bool {
        self.session.closed().is_some()
    }

    /// Whether bytes wait to be written (to rustls or the socket).
    pub fn wants_write(&self) -> bool {
        self.session.has_output() || self.tls.as_ref().is_some_and(|tls| tls.wants_write())
    }

    /// Queues a request under the next request id and returns the id; it goes out with the next
    /// [`Connection::flush`] or [`Connection::ready`].
    pub fn send(&mut self, frame: &ClientFrame) -> Result<u32, ClientError> {
        Ok(self.session.send(frame)?)
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.session.poll_event()
    }

    /// When [`Connection::on_tick`] next has something to do.
    pub fn next_tick(&self) -> Option<Instant> {
        self.session.next_tick()
    }

    /// The heartbeat (see [`Session::on_tick`]); writes the `PING` it may queue.
    pub fn on_tick(&mut self, now: Instant) -> Result<Tick, ClientError> {
        let tick = self.session.on_tick(now);
        if tick == Tick::Pinged {
            self.flush()?;
        }
        Ok(tick)
    }

    /// Handles readiness: reads until `WouldBlock` into the session, then writes until done or
    /// `WouldBlock`. Events are left for [`Connection::poll_event`], also when this returns an
    /// error, which means the connection is over: `Closed(None)` at the end of the stream (after
    /// a [`Event::Goodbye`], if the server sent one), or why it broke.
    pub fn ready(&mut self, now: Instant) -> Result<(), ClientError> {
        self.check_open()?;
        let read = match &mut self.tls {
            None => read_plain(&mut self.stream, &mut self.session, now),
            Some(tls) => read_tls(&mut self.stream, tls, &mut self.session, now),
        };
        if let Err(e) = read {
            return Err(self.fail(e));
        }
        self.check_open()?;
        self.flush()
    }

    /// Writes what waits until done or `WouldBlock`.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.check_open()?;
        let written = match &mut self.tls {
            None => flush_plain(&mut self.stream, &mut self.session),
            Some(tls) => flush_tls(&mut self.stream, tls, &mut self.session),
        };
        written.map_err(|e| self.fail(e))
    }

    fn check_open(&self) -> Result<(), ClientError> {
        match self.session.closed() {
            Some(why) => Err(why.clone().into()),
            None => Ok(()),
        }
    }

    /// The socket or TLS broke: the session is over; says why.
    fn fail(&mut self, e: Failure) -> ClientError {
        self.session.handle_eof();
        match e {
            Failure::Io(e) if is_closed(&e) => ClientError::Closed(None),
            Failure::Io(e) => ClientError::Io(e),
            Failure::Tls(e) => match &self.pin {
                Some((expected, seen)) if seen.get().is_some_and(|got| got != *expected) => {
                    ClientError::FingerprintMismatch {
                        expected: fingerprint_hex(expected),
                        got: seen.get().map(|got| fingerprint_hex(&got)).unwrap_or_default(),
                    }
                }
                _ => ClientError::Tls(e.to_string()),
            },
        }
    }
}

/// Why reading or writing stopped.
enum Failure {
    Io(io::Error),
    Tls(rustls::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
}

fn read_plain(stream: &mut TcpStream, session: &mut Session, now: Instant) -> Result<(), Failure> {
    let mut chunk = [0u8; READ_CHUNK];
    while session.closed().is_none() {
        match stream.read(&mut chunk) {
            Ok(0) => session.handle_eof(),
            Ok(n) => session.handle_bytes(&chunk[..n], now),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn read_tls(
    stream: &mut TcpStream,
    tls: &mut ClientConnection,
    session: &mut Session,
    now: Instant,
) -> Result<(), Failure> {
    let mut chunk = [0u8; READ_CHUNK];
    while session.closed().is_none() {
        let open = match tls.read_tls(stream) {
            Ok(0) => false,
            Ok(_) => {
                if let Err(e) = tls.process_new_packets() {
                    // Let the server see the alert rustls queued, then report the real cause.
                    let _ = tls.write_tls(stream);
                    return Err(Failure::Tls(e));
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        // Take the plaintext out after every batch of records: rustls refuses to decrypt more
        // while its plaintext buffer is full, which a busy room fills in one read.
        loop {
            match tls.reader().read(&mut chunk) {
                Ok(0) => {
                    session.handle_eof();
                    break;
                }
                Ok(n) => session.handle_bytes(&chunk[..n], now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The peer closed the socket without close_notify: the end all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    session.handle_eof();
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !open {
            session.handle_eof();
        }
    }
    Ok(())
}

fn flush_plain(stream: &mut TcpStream, session: &mut Session) -> Result<(), Failure> {
    while session.has_output() {
        match stream.write(session.pending_output()) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(n) => session.consume_output(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn flush_tls(stream: &mut TcpStream, tls: &mut ClientConnection, session: &mut Session) -> Result<(), Failure> {
    loop {
        // Plaintext into rustls, as much as its buffer takes (before the handshake completes it
        // is held there, and sent once it does).
        while session.has_output() {
            match tls.writer().write(session.pending_output()) {
                Ok(0) => break,
                Ok(n) => session.consume_output(n),
                Err(e) => return Err(e.into()),
            }
        }
        if !tls.wants_write() {
            return Ok(());
        }
        // Records onto the socket.
        while tls.wants_write() {
            match tls.write_tls(stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !session.has_output() {
            return Ok(());
        }
    }
}
