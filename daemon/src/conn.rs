//! One client connection: its socket (plaintext or rustls), its buffers, and its session state.
//!
//! Memory is spent only while there is something to hold: the read buffer exists while a partial
//! frame is buffered, the outbound queue holds shared `Bytes` (a published delta is one
//! allocation for every recipient), and SYNC state is boxed and created on first use. An idle
//! plaintext connection is this struct, its slab slot, and its room subscriptions.
//!
//! Outbound frames wait in a bounded queue and are written with vectored writes, so many frames
//! queued during one loop iteration leave in one system call. A connection whose queue passes the
//! limit is told to resync and closed (see `Conn::queue`), so a reader that stopped reading
//! costs a bounded amount of memory and nobody else's latency.

use crate::sync::SyncState;
use crate::worker::ConnRef;
use bytes::{Buf, Bytes, BytesMut};
use chime_protocol::{ErrorCode, Goodbye, ServerFrame};
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

/// Where a connection is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for `HELLO`.
    Handshake,
    /// Handshake done, not logged in.
    Open,
    /// A password or resume request is with the workers.
    Authenticating,
    /// Logged in.
    Authed(Session),
}

/// The logged-in user of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// User id.
    pub user_id: u64,
    /// User name, shared with the jobs this connection submits.
    pub name: Arc<str>,
    /// SHA-256 of the session token, for LOGOUT.
    pub token_hash: [u8; 32],
}

/// What sort of frame is queued, for the slow-consumer policy: ephemeral frames (typing,
/// presence) are dropped first when a queue is over its limit; anything else overflowing means
/// the client must resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Replies and durable deltas.
    Durable,
    /// State that the next update supersedes.
    Ephemeral,
}

/// One connection.
pub struct Conn {
    /// Identity across slot reuse.
    pub id: ConnRef,
    sock: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Handshake / login state.
    pub phase: Phase,
    /// Bytes read but not yet decoded (a partial frame). Empty, unallocated, most of the time.
    pub rbuf: BytesMut,
    /// Frames waiting to be written; the front one may be partly written already.
    outq: VecDeque<(Bytes, Class)>,
    /// Bytes in `outq`.
    out_bytes: usize,
    /// Ephemeral bytes in `outq`.
    ephemeral_bytes: usize,
    /// Rooms whose pushes this connection receives (it is in each room's subscriber list).
    pub rooms: Vec<u64>,
    /// SYNC and catch-up state, created on first SYNC.
    pub sync: Option<Box<SyncState>>,
    /// Loop tick (seconds) at which a frame last arrived.
    pub last_heard: u32,
    /// A PING is outstanding.
    pub ping_sent: bool,
    /// Requests handed to workers and not yet answered; reading pauses at a cap.
    pub inflight: u32,
    /// Set once the connection must close after flushing what is queued.
    pub closing: bool,
    /// Whether the connection is in the loop's list of connections to flush.
    pub dirty: bool,
}

/// Outcome of a read.
pub enum ReadOutcome {
    /// Read what there was; the socket would block now.
    Drained,
    /// Read a slice; more may be waiting (fairness: come back next iteration).
    More,
    /// The peer closed or the socket failed.
    Closed,
}

/// How many bytes one readable event may consume before yielding to other connections.
const READ_BUDGET: usize = 256 * 1024;

/// Largest number of queued frames handed to one vectored write.
const MAX_IOVECS: usize = 128;

impl Conn {
    /// Wraps an accepted socket.
    pub fn new(
        id: ConnRef,
        sock: TcpStream,
        peer: SocketAddr,
        tls: Option<Box<rustls::ServerConnection>>,
        now: u32,
    ) -> Conn {
        Conn {
            id,
            sock,
            tls,
            peer,
            phase: Phase::Handshake,
            rbuf: BytesMut::new(),
            outq: VecDeque::new(),
            out_bytes: 0,
            ephemeral_bytes: 0,
            rooms: Vec::new(),
            sync: None,
            last_heard: now,
            ping_sent: false,
            inflight: 0,
            closing: false,
            dirty: false,
        }
    }

    /// The socket, for (re)registration.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// The session, if logged in.
    pub fn session(&self) -> Option<&Session> {
        match &self.phase {
            Phase::Authed(s) => Some(s),
            _ => None,
        }
    }

    /// Bytes queued for sending.
    pub fn queued_bytes(&self) -> usize {
        self.out_bytes
    }

    /// Whether anything waits to be written (in the queue or inside TLS).
    pub fn has_pending_output(&self) -> bool {
        self.out_bytes > 0 || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Queues a frame. Returns false when the queue is over `limit` even after dropping ephemeral
    /// frames: the caller must then cut the connection off with a resync.
    pub fn queue(&mut self, frame: Bytes, class: Class, limit: usize) -> bool {
        if frame.is_empty() || self.closing {
            return true;
        }
        if self.out_bytes + frame.len() > limit {
            self.drop_ephemeral();
            if self.out_bytes + frame.len() > limit {
                return false;
            }
        }
        self.out_bytes += frame.len();
        if class == Class::Ephemeral {
            self.ephemeral_bytes += frame.len();
        }
        self.outq.push_back((frame, class));
        true
    }

    fn drop_ephemeral(&mut self) {
        if self.ephemeral_bytes == 0 {
            return;
        }
        // The front frame may be half written; it must go out whole.
        let front = self.outq.pop_front();
        self.outq.retain(|(b, c)| {
            let keep = *c == Class::Durable;
            if !keep {
                self.out_bytes -= b.len();
            }
            keep
        });
        if let Some(f) = front {
            self.outq.push_front(f);
        }
        self.ephemeral_bytes = self.outq.iter().filter(|(_, c)| *c == Class::Ephemeral).map(|(b, _)| b.len()).sum();
    }

    /// Replaces everything queued with a GOODBYE and marks the connection closing. Used when the
    /// queue overflowed (the client must resync) and on an idle timeout.
    pub fn goodbye(&mut self, code: ErrorCode, message: &str, resync: bool) {
        if self.closing {
            return;
        }
        // Keep the front frame, which may be partly written, so the stream stays parseable up to
        // the GOODBYE.
        self.outq.truncate(1);
        self.out_bytes = self.outq.iter().map(|(b, _)| b.len()).sum();
        self.ephemeral_bytes = self.outq.iter().filter(|(_, c)| *c == Class::Ephemeral).map(|(b, _)| b.len()).sum();
        self.push_goodbye(code, message, resync);
    }

    /// Queues a GOODBYE after what is already queued, then closes (graceful shutdown: replies
    /// already queued still go out).
    pub fn goodbye_after_queue(&mut self, code: ErrorCode, message: &str) {
        if !self.closing {
            self.push_goodbye(code, message, false);
        }
    }

    fn push_goodbye(&mut self, code: ErrorCode, message: &str, resync: bool) {
        let frame = ServerFrame::Goodbye(Goodbye { code, message: message.to_string(), resync }).encode(0);
        self.out_bytes += frame.len();
        self.outq.push_back((frame, Class::Durable));
        self.closing = true;
    }

    /// Reads from the socket into `rbuf` (through TLS if any), using `scratch` for TLS plaintext.
    pub fn read(&mut self, scratch: &mut [u8], max_buffered: usize) -> ReadOutcome {
        let mut budget = READ_BUDGET;
        loop {
            if self.rbuf.len() >= max_buffered {
                // A backlog of whole frames waits (requests paused at the in-flight cap); reading
                // more now would only grow memory. The loop reads again after it drains.
                return ReadOutcome::More;
            }
            let result = match &mut self.tls {
                None => read_plain(&mut self.sock, &mut self.rbuf, scratch),
                Some(tls) => read_tls(tls, &mut self.sock, &mut self.rbuf, scratch),
            };
            match result {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        return ReadOutcome::More;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("read from {} failed: {e}", self.peer);
                    return ReadOutcome::Closed;
                }
            }
        }
    }

    /// Frees the read buffer's memory once it holds nothing, so idle connections cost nothing.
    pub fn shrink_read_buffer(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
    }

    /// Gives back the memory of empty buffers (called once a second): a busy connection keeps
    /// its queue's allocation between bursts, an idle one holds none.
    pub fn shrink_idle(&mut self) {
        if self.outq.is_empty() && self.outq.capacity() > 0 {
            self.outq = VecDeque::new();
        }
        self.shrink_read_buffer();
    }

    /// Writes as much as the socket takes. Returns Err when the socket failed.
    pub fn flush(&mut self) -> io::Result<()> {
        match self.tls.is_some() {
            false => self.flush_plain(),
            true => self.flush_tls(),
        }
    }

    fn flush_plain(&mut self) -> io::Result<()> {
        while !self.outq.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (b, _) in self.outq.iter().take(MAX_IOVECS) {
                slices[n] = IoSlice::new(b);
                n += 1;
            }
            match self.sock.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.consume(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn flush_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        loop {
            // Move queued plaintext into rustls (bounded by its buffer limit), then push records.
            while let Some((front, _)) = self.outq.front() {
                let taken = tls.writer().write(front)?;
                if taken == 0 {
                    break;
                }
                let len = front.len();
                if taken == len {
                    if let Some((b, c)) = self.outq.pop_front() {
                        self.out_bytes -= b.len();
                        if c == Class::Ephemeral {
                            self.ephemeral_bytes -= b.len();
                        }
                    }
                } else {
                    consume(&mut self.outq, &mut self.out_bytes, &mut self.ephemeral_bytes, taken);
                    break;
                }
            }
            if !tls.wants_write() {
                return Ok(());
            }
            match tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn consume(&mut self, n: usize) {
        consume(&mut self.outq, &mut self.out_bytes, &mut self.ephemeral_bytes, n);
    }

    /// Whether the TLS handshake is still running (then the stream carries no frames yet).
    pub fn tls_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Sends a TLS close_notify, best effort.
    pub fn close_notify(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = tls.write_tls(&mut self.sock);
        }
    }
}

/// Drops `n` written bytes from the front of a queue, keeping the byte counts right.
fn consume(outq: &mut VecDeque<(Bytes, Class)>, out_bytes: &mut usize, ephemeral: &mut usize, mut n: usize) {
    *out_bytes -= n;
    while n > 0 {
        let Some((front, class)) = outq.front_mut() else {
            break;
        };
        let is_eph = *class == Class::Ephemeral;
        if n >= front.len() {
            n -= front.len();
            if is_eph {
                *ephemeral -= front.len();
            }
            outq.pop_front();
        } else {
            front.advance(n);
            if is_eph {
                *ephemeral -= n;
            }
            n = 0;
        }
    }
}

fn read_plain(sock: &mut TcpStream, rbuf: &mut BytesMut, scratch: &mut [u8]) -> io::Result<usize> {
    let n = sock.read(scratch)?;
    rbuf.extend_from_slice(&scratch[..n]);
    Ok(n)
}

fn read_tls(
    tls: &mut rustls::ServerConnection,
    sock: &mut TcpStream,
    rbuf: &mut BytesMut,
    scratch: &mut [u8],
) -> io::Result<usize> {
    let n = tls.read_tls(sock)?;
    if n == 0 {
        return Ok(0);
    }
    let state = tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut left = state.plaintext_bytes_to_read();
    while left > 0 {
        let got = tls.reader().read(scratch)?;
        if got == 0 {
            break;
        }
        rbuf.extend_from_slice(&scratch[..got]);
        left = left.saturating_sub(got);
    }
    if state.peer_has_closed() && rbuf.is_empty() {
        return Ok(0);
    }
    Ok(n)
}
