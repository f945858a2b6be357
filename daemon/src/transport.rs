//! One client connection's transport: its socket (plaintext or rustls) and its buffers. What the
//! connection *is* in the protocol (logged in as whom, its rooms, its SYNC state, its requests in
//! flight) is the core's (`core::Link`); this module only moves bytes.
//!
//! Memory is spent only while there is something to hold: the read buffer exists while a partial
//! frame is buffered, the outbound queue holds shared `Bytes` (a published delta is one
//! allocation for every recipient). An idle plaintext connection is this struct and its slab
//! slot.
//!
//! ## What a queued frame costs
//!
//! The outbound queue is bounded by what it costs in memory, not by frame bytes alone: a queue of
//! ten thousand 22-byte PONGs, each its own allocation and queue slot, costs far more than 220 KB.
//! So small frames are not queued one by one: they are copied into one coalescing buffer at the
//! queue's tail (a PONG costs its 22 bytes), and every queued `Bytes` is charged its length plus
//! [`CHUNK_OVERHEAD`] for its slot and allocation. [`Transport::cost`] is that sum plus the capacity of
//! the queue and of the coalescing buffer; it is what `max_outbound_bytes` bounds, and what the
//! server-wide budget adds up.
//!
//! A connection whose queue passes the limit is told to resync and closed (see [`Transport::queue`]);
//! one that makes no write progress for the write timeout is closed outright
//! ([`Transport::stalled_since`]), closing or not, so a peer with a zero TCP window cannot hold its
//! memory. Outbound frames are written with vectored writes, so many frames queued during one
//! loop iteration leave in one system call.

use crate::work::ConnRef;
use bytes::{Buf, Bytes, BytesMut};
use chime_protocol::{ErrorCode, Goodbye, ServerFrame};
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;

/// What sort of frame is queued, for the memory accounting and the slow-consumer policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A reply or page made for this connection alone. Small ones are coalesced.
    Own,
    /// A slice of frames shared with other connections (published deltas): counted against this
    /// connection's limit, but its memory is counted once, server-wide, by its owner.
    Shared,
    /// State that the next update supersedes (typing, presence): dropped first when the queue
    /// is over its limit.
    Ephemeral,
    /// File chunks of a download: they wait in a queue of their own that every other frame
    /// overtakes. One enters the write queue only when nothing else waits there, and once it has
    /// started it is finished first (a frame is never cut), so chat waits at most one chunk
    /// (64 KiB). Counted as the connection's own; the download window bounds how many wait.
    Bulk,
}

/// Frames at most this long are copied into the coalescing buffer instead of queued as a `Bytes`.
const COALESCE_MAX: usize = 512;

/// The coalescing buffer is sealed into a chunk once it holds this much.
const TAIL_CAP: usize = 16 * 1024;

/// What one queued `Bytes` costs beyond its bytes: its queue slot (a `Bytes` and a class) plus the
/// allocator's header of the buffer it points into. An estimate, on the high side.
pub const CHUNK_OVERHEAD: usize = 64;

/// One connection's transport.
pub struct Transport {
    /// Identity across slot reuse.
    pub id: ConnRef,
    sock: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Bytes read but not yet decoded (a partial frame). Empty, unallocated, most of the time.
    pub rbuf: BytesMut,
    /// Frames waiting to be written, before `tail`; the front one may be partly written already.
    outq: VecDeque<(Bytes, Class)>,
    /// Small frames coalesced after `outq`, written after it.
    tail: BytesMut,
    /// Bulk frames (see [`Class::Bulk`]) not yet moved into `outq`; written after everything else.
    bulkq: VecDeque<Bytes>,
    /// Bytes in `outq` not yet written.
    out_bytes: usize,
    /// Ephemeral bytes in `outq`.
    ephemeral_bytes: usize,
    /// Bytes of `Class::Own` chunks in `outq` (what the server-wide budget counts for this
    /// connection, with `tail`'s capacity).
    own_bytes: usize,
    /// Reading is paused because the connection's replies are not being read (its queue costs
    /// more than half its limit); the loop reads again once the queue has drained.
    pub read_paused: bool,
    /// `own_cost()` as the server's total last counted it (see `server::Totals`).
    pub counted_cost: usize,
    /// Set once the connection must close after flushing what is queued.
    pub closing: bool,
    /// Whether the connection is in the loop's list of connections to flush.
    pub dirty: bool,
    /// Since when (loop tick) output has been waiting with no byte written: the write timeout
    /// runs from here. `None` when nothing is pending or the last flush made progress.
    pub stalled_since: Option<u32>,
}

/// Outcome of a read.
pub enum ReadOutcome {
    /// Read what there was; the socket would block now.
    Drained,
    /// Read a slice; more may be waiting (fairness: come back next iteration).
    More,
    /// The peer closed its side (EOF): it sends nothing more, but may still read what it is owed.
    Eof,
    /// The socket failed.
    Failed,
}

/// How many bytes one readable event may consume before yielding to other connections.
const READ_BUDGET: usize = 256 * 1024;

/// Largest number of queued chunks handed to one vectored write.
const MAX_IOVECS: usize = 128;

impl Transport {
    /// Wraps an accepted socket.
    pub fn new(
        id: ConnRef,
        sock: TcpStream,
        peer: SocketAddr,
        tls: Option<Box<rustls::ServerConnection>>,
    ) -> Transport {
        Transport {
            id,
            sock,
            tls,
            peer,
            rbuf: BytesMut::new(),
            outq: VecDeque::new(),
            tail: BytesMut::new(),
            bulkq: VecDeque::new(),
            out_bytes: 0,
            ephemeral_bytes: 0,
            own_bytes: 0,
            read_paused: false,
            counted_cost: 0,
            closing: false,
            dirty: false,
            stalled_since: None,
        }
    }

    /// The socket, for (re)registration.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// Bytes queued for sending (not counting overheads).
    pub fn queued_bytes(&self) -> usize {
        self.out_bytes + self.tail.len() + self.bulk_bytes()
    }

    /// Bytes of bulk frames waiting in their own queue.
    fn bulk_bytes(&self) -> usize {
        self.bulkq.iter().map(Bytes::len).sum()
    }

    /// What the outbound queue costs in memory: every byte queued, [`CHUNK_OVERHEAD`] per queued
    /// chunk, the queue's slots and the coalescing buffer's capacity. `max_outbound_bytes` bounds
    /// it. (The read buffer is bounded apart, by the largest frame: counting it here would let a
    /// large frame still being received pause the reading that would complete it.)
    pub fn cost(&self) -> usize {
        self.out_bytes + self.bulk_bytes() + self.queue_overheads()
    }

    /// Everything the connection pins: its queue's cost (shared chunks at their full length) and
    /// its read buffer.
    pub fn memory(&self) -> usize {
        self.cost() + self.rbuf.capacity()
    }

    /// What the connection holds alone (shared chunks are counted server-wide once, by their
    /// owner): its own queued bytes, the queue's overheads, the read buffer. What the server-wide
    /// budget adds up per connection.
    pub fn own_cost(&self) -> usize {
        self.own_bytes + self.bulk_bytes() + self.queue_overheads() + self.rbuf.capacity()
    }

    fn queue_overheads(&self) -> usize {
        (self.outq.len() + self.bulkq.len()) * CHUNK_OVERHEAD
            + self.bulkq.capacity() * std::mem::size_of::<Bytes>()
            + self.outq.capacity() * std::mem::size_of::<(Bytes, Class)>()
            + self.tail.capacity()
    }

    /// Whether anything waits to be written (in the queue or inside TLS).
    pub fn has_pending_output(&self) -> bool {
        self.out_bytes > 0
            || !self.tail.is_empty()
            || !self.bulkq.is_empty()
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Moves the next bulk frame into the write queue when nothing else waits to be written (so
    /// chat frames overtake file chunks, and a chunk in the write queue is finished before
    /// anything queued after it). Returns whether there is anything to write.
    fn promote_bulk(&mut self) -> bool {
        if self.out_bytes == 0 && self.tail.is_empty() {
            if let Some(b) = self.bulkq.pop_front() {
                self.push_chunk(b, Class::Bulk);
            }
        }
        self.out_bytes > 0 || !self.tail.is_empty()
    }

    /// Queues a frame. Returns false when the queue's cost would pass `limit` even after dropping
    /// ephemeral frames: the caller must then cut the connection off with a resync.
    pub fn queue(&mut self, frame: Bytes, class: Class, limit: usize) -> bool {
        if frame.is_empty() || self.closing {
            return true;
        }
        if class == Class::Bulk {
            if self.cost() + frame.len() + CHUNK_OVERHEAD > limit {
                return false;
            }
            self.bulkq.push_back(frame);
            return true;
        }
        let coalesce = class == Class::Own && frame.len() <= COALESCE_MAX;
        // Coalescing may grow the buffer by about the frame's length; a chunk adds its overhead.
        // (The buffer can overshoot by one growth step, at most `TAIL_CAP`.)
        let added = if coalesce { frame.len() } else { frame.len() + CHUNK_OVERHEAD };
        if self.cost() + added > limit {
            self.drop_ephemeral();
            if self.cost() + added > limit {
                return false;
            }
        }
        if coalesce {
            if self.tail.len() + frame.len() > TAIL_CAP {
                self.seal_tail();
            }
            self.tail.extend_from_slice(&frame);
            return true;
        }
        self.seal_tail();
        self.push_chunk(frame, class);
        true
    }

    fn push_chunk(&mut self, frame: Bytes, class: Class) {
        self.out_bytes += frame.len();
        match class {
            Class::Ephemeral => self.ephemeral_bytes += frame.len(),
            Class::Own | Class::Bulk => self.own_bytes += frame.len(),
            Class::Shared => {}
        }
        self.outq.push_back((frame, class));
    }

    /// Moves the coalesced small frames into the queue as one chunk, so a larger frame queued
    /// next goes out after them.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let sealed = self.tail.split().freeze();
            self.push_chunk(sealed, Class::Own);
        }
    }

    fn drop_ephemeral(&mut self) {
        if self.ephemeral_bytes == 0 {
            return;
        }
        // The front frame may be half written; it must go out whole.
        let front = self.outq.pop_front();
        self.outq.retain(|(b, c)| *c != Class::Ephemeral || b.is_empty());
        if let Some(f) = front {
            self.outq.push_front(f);
        }
        self.recount();
    }

    /// Recomputes the byte counters from the queue (after removing chunks in the middle).
    fn recount(&mut self) {
        let count = |class: Class| self.outq.iter().filter(|(_, c)| *c == class).map(|(b, _)| b.len()).sum::<usize>();
        self.out_bytes = self.outq.iter().map(|(b, _)| b.len()).sum();
        self.ephemeral_bytes = count(Class::Ephemeral);
        self.own_bytes = count(Class::Own) + count(Class::Bulk);
    }

    /// Replaces everything queued with a GOODBYE and marks the connection closing. Used when the
    /// queue overflowed (the client must resync), on an idle or auth timeout, and when the
    /// session was revoked.
    pub fn goodbye(&mut self, code: ErrorCode, message: &str, resync: bool) {
        if self.closing {
            return;
        }
        // Keep the front frame, which may be partly written, so the stream stays parseable up to
        // the GOODBYE.
        // When the queue is empty, the coalescing buffer's front may be the partly written frame:
        // it is kept whole (it is small).
        if !self.outq.is_empty() {
            self.outq.truncate(1);
            self.tail.clear();
        }
        self.bulkq = VecDeque::new();
        self.recount();
        self.push_goodbye(code, message, resync);
        self.give_back_memory();
    }

    /// Frames not yet decoded are never decoded once the connection is closing: free them.
    fn drop_unread(&mut self) {
        self.rbuf = BytesMut::new();
    }

    /// Queues a GOODBYE after what is already queued, then closes (graceful shutdown: replies
    /// already queued still go out).
    pub fn goodbye_after_queue(&mut self, code: ErrorCode, message: &str) {
        if !self.closing {
            self.push_goodbye(code, message, false);
        }
    }

    /// Closes once what is queued is written, with no GOODBYE (the peer half-closed: it is owed
    /// its replies, and will not read anything more).
    pub fn finish(&mut self) {
        self.closing = true;
        self.drop_unread();
    }

    fn push_goodbye(&mut self, code: ErrorCode, message: &str, resync: bool) {
        let goodbye = ServerFrame::Goodbye(Goodbye { code, message: message.to_string(), resync });
        if let Ok(frame) = goodbye.encode(0) {
            self.seal_tail();
            self.push_chunk(frame, Class::Own);
        }
        self.closing = true;
        self.drop_unread();
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
                Ok(0) => return ReadOutcome::Eof,
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
                    return ReadOutcome::Failed;
                }
            }
        }
    }

    /// Frees the read buffer's memory once it holds nothing, so idle connections cost nothing,
    /// and its spare capacity once it holds little (a partial frame left after a large read).
    pub fn shrink_read_buffer(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        } else if self.rbuf.capacity() > 64 * 1024 && self.rbuf.len() < self.rbuf.capacity() / 4 {
            self.rbuf = BytesMut::from(&self.rbuf[..]);
        }
    }

    /// Gives back the memory of empty buffers (called once a second): a busy connection keeps
    /// its queue's allocation between bursts, an idle one holds none.
    pub fn shrink_idle(&mut self) {
        if self.bulkq.is_empty() && self.bulkq.capacity() > 0 {
            self.bulkq = VecDeque::new();
        }
        if self.outq.is_empty() && self.tail.is_empty() {
            self.give_back_memory();
        }
        self.shrink_read_buffer();
    }

    /// Frees the queue's and the coalescing buffer's spare capacity.
    fn give_back_memory(&mut self) {
        if self.outq.is_empty() && self.outq.capacity() > 0 {
            self.outq = VecDeque::new();
        } else if self.outq.capacity() > 4 * self.outq.len().max(8) {
            self.outq.shrink_to_fit();
        }
        if self.tail.is_empty() && self.tail.capacity() > 0 {
            self.tail = BytesMut::new();
        }
    }

    /// Writes as much as the socket takes. Returns Err when the socket failed. `now` (the loop's
    /// tick) starts the write timeout when output is left waiting with no progress.
    pub fn flush(&mut self, now: u32) -> io::Result<()> {
        let before = self.queued_bytes();
        let (result, wrote) = match self.tls.is_some() {
            false => self.flush_plain(),
            true => self.flush_tls(),
        };
        // Moving plaintext into rustls counts as progress too: it is bounded by rustls' buffer
        // limit, so a stuck socket stops it within one buffer.
        if wrote || self.queued_bytes() < before || !self.has_pending_output() {
            self.stalled_since = None;
        }
        if self.has_pending_output() && self.stalled_since.is_none() {
            self.stalled_since = Some(now);
        }
        result
    }

    /// Returns the outcome and whether any byte reached the socket.
    fn flush_plain(&mut self) -> (io::Result<()>, bool) {
        let mut wrote = false;
        while self.promote_bulk() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (b, _) in self.outq.iter().take(MAX_IOVECS - 1) {
                slices[n] = IoSlice::new(b);
                n += 1;
            }
            if n < MAX_IOVECS - 1 && !self.tail.is_empty() {
                slices[n] = IoSlice::new(&self.tail);
                n += 1;
            }
            match self.sock.write_vectored(&slices[..n]) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), wrote),
                Ok(written) => {
                    wrote = true;
                    self.consume(written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Ok(()), wrote),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return (Err(e), wrote),
            }
        }
        (Ok(()), wrote)
    }

    fn flush_tls(&mut self) -> (io::Result<()>, bool) {
        let mut wrote = false;
        loop {
            // Move queued plaintext into rustls (bounded by its buffer limit), then push records.
            loop {
                self.promote_bulk();
                let Some(tls) = self.tls.as_mut() else {
                    return (Ok(()), wrote);
                };
                let front: &[u8] = match self.outq.front() {
                    Some((b, _)) => b,
                    None if !self.tail.is_empty() => &self.tail,
                    None => break,
                };
                let taken = match tls.writer().write(front) {
                    Ok(n) => n,
                    Err(e) => return (Err(e), wrote),
                };
                if taken == 0 {
                    break;
                }
                consume(
                    &mut self.outq,
                    &mut self.tail,
                    &mut self.out_bytes,
                    &mut self.ephemeral_bytes,
                    &mut self.own_bytes,
                    taken,
                );
            }
            let Some(tls) = self.tls.as_mut() else {
                return (Ok(()), wrote);
            };
            if !tls.wants_write() {
                return (Ok(()), wrote);
            }
            match tls.write_tls(&mut self.sock) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), wrote),
                Ok(_) => wrote = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Ok(()), wrote),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(e), wrote),
            }
        }
    }

    fn consume(&mut self, n: usize) {
        consume(&mut self.outq, &mut self.tail, &mut self.out_bytes, &mut self.ephemeral_bytes, &mut self.own_bytes, n);
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

/// Drops `n` written bytes from the front of the queue (chunks first, then the coalescing
/// buffer), keeping the byte counts right.
fn consume(
    outq: &mut VecDeque<(Bytes, Class)>,
    tail: &mut BytesMut,
    out_bytes: &mut usize,
    ephemeral: &mut usize,
    own: &mut usize,
    mut n: usize,
) {
    while n > 0 {
        let Some((front, class)) = outq.front_mut() else {
            let k = n.min(tail.len());
            tail.advance(k);
            if tail.is_empty() {
                // Keeps the allocation for the next burst; `shrink_idle` frees it when idle.
                tail.clear();
            }
            return;
        };
        let k = n.min(front.len());
        *out_bytes -= k;
        match class {
            Class::Ephemeral => *ephemeral -= k,
            Class::Own | Class::Bulk => *own -= k,
            Class::Shared => {}
        }
        n -= k;
        if k == front.len() {
            outq.pop_front();
        } else {
            front.advance(k);
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

#[cfg(test)]
mod tests {
    use super::*;
    use chime_protocol::{FrameDecoder, Ping};

    /// A connection over a real loopback socket, and the peer's end.
    fn pair() -> (Transport, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (sock, addr) = listener.accept().expect("accept");
        sock.set_nonblocking(true).expect("non-blocking");
        let conn = Transport::new(ConnRef { key: 0, gen: 1 }, TcpStream::from_std(sock), addr, None);
        (conn, peer)
    }

    fn pong(nonce: u64) -> Bytes {
        ServerFrame::Pong(Ping { nonce }).encode(nonce as u32).expect("small")
    }

    #[test]
    fn small_replies_cost_their_bytes_not_an_allocation_each() {
        let (mut c, _peer) = pair();
        let mut bytes = 0;
        for n in 0..10_000 {
            let f = pong(n);
            bytes += f.len();
            assert!(c.queue(f, Class::Own, 4 << 20));
        }
        assert_eq!(c.queued_bytes(), bytes);
        // Sealed 16 KiB chunks: the overhead is per chunk, not per frame.
        let overhead = c.cost() - bytes;
        assert!(overhead < bytes / 4, "{overhead} bytes of overhead for {bytes} bytes of PONGs");
        assert_eq!(c.own_cost(), c.cost(), "replies are the connection's own");
    }

    #[test]
    fn the_limit_counts_cost_and_refuses_past_it() {
        let (mut c, _peer) = pair();
        let big = Bytes::from(vec![0u8; 1000]);
        let mut queued = 0;
        while c.queue(big.clone(), Class::Shared, 64 * 1024) {
            queued += 1;
            assert!(queued < 100, "never refused");
        }
        assert!(c.cost() <= 64 * 1024);
        assert_eq!(c.own_cost() + queued * 1000, c.cost(), "shared chunks are not the connection's own");
    }

    #[test]
    fn ephemeral_frames_are_dropped_first() {
        let (mut c, _peer) = pair();
        let eph = Bytes::from(vec![1u8; 20_000]);
        assert!(c.queue(eph.clone(), Class::Ephemeral, 64 * 1024));
        assert!(c.queue(eph.clone(), Class::Ephemeral, 64 * 1024));
        // This one only fits once the ephemeral ones (but the front, which may be half written)
        // are dropped.
        assert!(c.queue(Bytes::from(vec![2u8; 30_000]), Class::Shared, 64 * 1024));
        assert_eq!(c.queued_bytes(), 50_000);
    }

    #[test]
    fn frames_leave_in_order_and_a_stall_is_timed() {
        let (mut c, mut peer) = pair();
        assert!(c.queue(pong(1), Class::Own, 4 << 20));
        assert!(c.queue(ServerFrame::Pong(Ping { nonce: 2 }).encode(2).expect("small"), Class::Shared, 4 << 20));
        assert!(c.queue(pong(3), Class::Own, 4 << 20));
        c.flush(5).expect("flush");
        assert!(!c.has_pending_output());
        assert_eq!(c.stalled_since, None);
        let mut got = vec![0u8; 3 * pong(1).len()];
        peer.read_exact(&mut got).expect("read");
        let mut buf = BytesMut::from(&got[..]);
        let nonces: Vec<u64> = std::iter::from_fn(|| FrameDecoder::default().decode(&mut buf).expect("frame"))
            .map(|raw| match ServerFrame::decode(&raw) {
                Ok(ServerFrame::Pong(p)) => p.nonce,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(nonces, [1, 2, 3]);
        // The peer stops reading: the queue stops draining and the stall is dated.
        let chunk = Bytes::from(vec![0u8; 256 * 1024]);
        let mut now = 10;
        while !c.has_pending_output() || c.stalled_since.is_none() {
            assert!(c.queue(chunk.clone(), Class::Shared, 64 << 20));
            c.flush(now).expect("flush");
            now += 1;
            assert!(now < 1000, "the kernel never filled up");
        }
        let since = c.stalled_since.expect("stalled");
        c.flush(now + 5).expect("flush");
        assert_eq!(c.stalled_since, Some(since), "no progress: the stall keeps its start");
        // A GOODBYE replaces what is queued and drops unread input.
        c.rbuf.extend_from_slice(b"unread");
        c.goodbye(ErrorCode::RESYNC_REQUIRED, "behind", true);
        assert!(c.closing && c.rbuf.is_empty());
        assert!(c.queued_bytes() <= chunk.len() + 64);
    }

    #[test]
    fn chat_overtakes_queued_file_chunks_but_never_cuts_one() {
        let (mut c, mut peer) = pair();
        let chunk = |n: u8| {
            ServerFrame::FileChunk(chime_protocol::FileChunk {
                download: 1,
                offset: u64::from(n),
                data: vec![n; 60_000],
            })
            .encode(0)
            .expect("fits")
        };
        for n in 0..4 {
            assert!(c.queue(chunk(n), Class::Bulk, 4 << 20));
        }
        // Written up to the first chunk only partly: the kernel's buffer is not involved yet, so
        // move the first bulk frame into the write queue by hand as a flush would.
        assert!(c.promote_bulk());
        assert!(c.queue(pong(7), Class::Own, 4 << 20));
        assert!(c.queue(pong(8), Class::Own, 4 << 20));
        assert_eq!(c.queued_bytes(), 4 * chunk(0).len() + 2 * pong(7).len());
        assert!(c.cost() >= c.queued_bytes(), "bulk bytes are counted");
        c.flush(1).expect("flush");
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        let mut buf = BytesMut::new();
        let mut order = Vec::new();
        let mut scratch = vec![0u8; 64 * 1024];
        while order.len() < 6 {
            if c.has_pending_output() {
                c.flush(1).expect("flush");
            }
            let n = peer.read(&mut scratch).expect("read");
            buf.extend_from_slice(&scratch[..n]);
            while let Some(raw) = FrameDecoder::default().decode(&mut buf).expect("whole frames") {
                order.push(match ServerFrame::decode(&raw).expect("valid") {
                    ServerFrame::FileChunk(f) => format!("chunk{}", f.offset),
                    ServerFrame::Pong(p) => format!("pong{}", p.nonce),
                    other => panic!("{other:?}"),
                });
            }
        }
        // The chunk that had started goes first and whole; the replies overtake the rest.
        assert_eq!(order, ["chunk0", "pong7", "pong8", "chunk1", "chunk2", "chunk3"]);
    }
}
