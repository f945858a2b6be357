//! One client connection's protocol state, with no I/O and no clock (the shape of quinn-proto).
//!
//! A [`Session`] knows everything a Chime client must do on a connection and nothing about how
//! bytes move. A driver ([`crate::blocking`], [`crate::nonblocking`], a full-screen client's event
//! loop, a C caller, a test) does the moving:
//!
//! - it feeds what it read with [`Session::handle_bytes`] (or frames it split off itself with
//!   [`Session::handle_frame`]) and the end of the stream with [`Session::handle_eof`];
//! - it writes [`Session::pending_output`] and reports how much went out with
//!   [`Session::consume_output`];
//! - it takes [`Event`]s with [`Session::poll_event`];
//! - it calls [`Session::on_tick`] no later than [`Session::next_tick`].
//!
//! Time only comes in as `now: Instant` arguments, so every behaviour here, heartbeats included,
//! is tested in memory (see the tests at the bottom).
//!
//! What the session does by itself:
//!
//! - **Handshake.** `HELLO` is queued when the session is created, as request 1. The `WELCOME`
//!   must state this crate's protocol version (else the session closes with a
//!   [`SessionError::Protocol`]); its `max_frame` bounds what [`Session::send`] accepts and its
//!   `heartbeat_secs` sets the heartbeat. Requests may be queued before the `WELCOME` arrives
//!   (pipelining), as the load generator does.
//! - **Requests.** [`Session::send`] hands out request ids 1, 2, 3, ..., skipping 0 and any id
//!   still awaiting its reply after wrap-around, and remembers what each request was. A reply is
//!   matched to its request by id, never by order, and must be the type that request expects
//!   (`POST` is answered `POSTED`, ...); anything else is reported as [`Event::Invalid`].
//! - **Other pushes** (types `0x9000` and up besides `DELTA` and `GOODBYE`, such as
//!   `SETTING_CHANGED`) are reported as [`Event::Push`] as they arrive, never taken for the reply
//!   to a request whatever request id they carry. Ordering them (a settings version) is the
//!   caller's.
//! - **Server pings** are answered at once with a `PONG` echoing the request id and nonce; they
//!   produce no event.
//! - **Heartbeat.** Once the server has been silent for one `heartbeat_secs`, [`Session::on_tick`]
//!   queues a `PING`; after three intervals of silence the server is declared dead
//!   ([`Tick::Dead`], [`SessionError::Silent`]). Any byte from the server counts as a sign of
//!   life.
//! - **SYNC.** Every `SYNC` sent through the session is tracked: each room's pages must be
//!   contiguous from the SYNC's cursor, each page's `resume_after` must be its last seq (the new
//!   cursor), and pages stop at the final one. A SYNC that names a room an earlier unfinished SYNC
//!   also named takes the room over, as the server does. A page breaking these rules is reported
//!   as [`Event::Invalid`] instead of being passed on: no caller ever sees a gap or a repeat inside
//!   a SYNC.
//! - **Followed rooms.** For a room given to [`Session::follow`] the session keeps a cursor, the
//!   last seq delivered, and turns pushes and SYNC pages into one stream of [`Event::Delta`]s
//!   that holds every delta of the room exactly once, in seq order.
//!
//! # Gaps: the session SYNCs by itself
//!
//! The log is the source of truth and pushes are best-effort (`docs/protocol.md` section 9). For a
//! followed room, a delta at or below the cursor is a duplicate and is dropped. One past
//! cursor + 1 means deltas were missed; rather than telling the caller to catch up, the session
//! queues the `SYNC` of that room from its cursor itself and reports [`Event::Gap`] (with the
//! SYNC's request id) for the caller's information. The remedy is always the same, and doing it
//! here means every driver gets it right without writing it again. While a room is being synced,
//! pushes that skip ahead are dropped without another SYNC: the server sends everything up to its
//! head in the pages and resumes pushes right after the final page, so the pages bring them.
//! Should a final page still stop short of a seq dropped meanwhile, one more SYNC is sent.
//!
//! Rooms that are not followed are not judged: their pushes pass through as they arrive (the load
//! generator counts duplicates and losses itself), and their SYNC pages are only checked.
//!
//! Nothing here is specific to an operating system: the session compiles wherever `std` does.

use bytes::BytesMut;
use chime_protocol::{
    ClientFrame, DecodeError, Delta, DeltaPage, EncodeError, ErrorBody, FrameDecoder, FrameType, Goodbye, Hello, Ping,
    RawFrame, RoomCursor, RoomId, Seq, ServerFrame, Sync, SyncDone, Welcome, DEFAULT_MAX_FRAME, MAGIC,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Deltas per page of the SYNCs the session sends by itself (gaps, [`Session::sync_followed`]).
pub const DEFAULT_SYNC_PAGE: u32 = 500;

/// The request id of the `HELLO` every session starts with.
pub const HELLO_ID: u32 = 1;

/// Output bytes already written that are worth moving out of the buffer's way.
const COMPACT_AT: usize = 64 * 1024;

/// What a session says about itself and asks of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Sent in `HELLO`, for the server's logs.
    pub client_name: String,
    /// Sent in `HELLO`, for the server's logs.
    pub client_version: String,
    /// The largest length field accepted from the server; a longer frame ends the session.
    pub max_frame: u32,
    /// Deltas per page of the SYNCs the session sends by itself.
    pub sync_page_size: u32,
}

impl SessionConfig {
    /// A configuration with the default maximum frame and sync page size.
    pub fn new(client_name: impl Into<String>, client_version: impl Into<String>) -> Self {
        SessionConfig {
            client_name: client_name.into(),
            client_version: client_version.into(),
            max_frame: DEFAULT_MAX_FRAME,
            sync_page_size: DEFAULT_SYNC_PAGE,
        }
    }
}

impl Default for SessionConfig {
    /// Client name `"chime"` and this crate's version.
    fn default() -> Self {
        SessionConfig::new("chime", env!("CARGO_PKG_VERSION"))
    }
}

/// Why the session refused a request, reported a frame as invalid, or closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The server sent bytes that are not a valid frame. [`DecodeError::is_fatal`] tells whether
    /// the stream could go on.
    #[error("undecodable frame from server: {0}")]
    Decode(#[from] DecodeError),
    /// The request would not fit in one frame; nothing was queued.
    #[error("request not sent: {0}")]
    Encode(#[from] EncodeError),
    /// The server did something the protocol does not allow here (a wrong reply type, a gap in a
    /// SYNC page, a reply to no request), or the request is larger than the server accepts.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The stream ended, after the server's `GOODBYE` if it sent one.
    #[error("connection closed by server{}", .0.as_ref().map(|g| format!(": {} ({})", g.message, g.code)).unwrap_or_default())]
    Closed(Option<Goodbye>),
    /// Nothing was heard from the server for three heartbeat intervals.
    #[error("nothing heard from the server for {} s", .0.as_secs())]
    Silent(Duration),
}

/// Something the caller should know, from [`Session::poll_event`], in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server accepted the handshake: its `WELCOME`.
    Connected(Welcome),
    /// A successful reply to request `request_id`: one per request, except a SYNC, which gets
    /// each `DELTA_PAGE` and then its `SYNC_DONE`. Replies to the requests the session sent by
    /// itself (its pings, its gap SYNCs) are not reported.
    Reply {
        /// The request answered.
        request_id: u32,
        /// The reply.
        frame: ServerFrame,
    },
    /// An `ERROR`: request `request_id` failed (id 0: the server could not tell which request,
    /// as when it refuses a handshake).
    Failed {
        /// The request that failed, or 0.
        request_id: u32,
        /// What the server said.
        error: ErrorBody,
    },
    /// A delta to show. For a followed room: the next one, exactly once and in seq order, from a
    /// push or a SYNC page. For any other room: a push, as it arrived.
    Delta {
        /// The delta.
        delta: Delta,
        /// The SYNC whose page carried it; `None` for a push.
        sync: Option<u32>,
    },
    /// A push of a followed room skipped ahead: deltas after `cursor` are missing. The session
    /// has already asked for them (`resync`, unless the session could not send).
    Gap {
        /// The room.
        room: RoomId,
        /// The last seq delivered.
        cursor: Seq,
        /// The seq that arrived.
        seq: Seq,
        /// The SYNC the session sent for the room.
        resync: Option<u32>,
    },
    /// A push other than `DELTA` and `GOODBYE` (`SETTING_CHANGED`, ...), as it arrived.
    Push(ServerFrame),
    /// The server's `GOODBYE`: it closes the connection next.
    Goodbye(Goodbye),
    /// A frame the session could not use: undecodable, the wrong reply, a SYNC page out of order,
    /// a reply to no request. `request_id` is the frame's (0 when it cannot be trusted). Unless the
    /// error is a fatal [`SessionError::Decode`], later frames are still read.
    Invalid {
        /// The frame's request id.
        request_id: u32,
        /// What is wrong.
        error: SessionError,
    },
}

/// What [`Session::on_tick`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Nothing to do now.
    Alive,
    /// The server has been silent for a heartbeat interval: a `PING` was queued.
    Pinged,
    /// The session is closed: the server was silent for three intervals (or the session had
    /// closed already).
    Dead,
}

/// A request awaiting its reply.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// The request's type, which decides the reply expected.
    ty: FrameType,
    /// Sent by the session itself: its replies are consumed, not reported.
    internal: bool,
}

/// Where one room of one SYNC stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncRoom {
    /// Pages continue after this seq.
    After(Seq),
    /// The final page came.
    Final,
    /// A later SYNC named the room, so this one no longer answers for it (pages the server sent
    /// before it saw the later SYNC may still arrive; they are passed on unchecked).
    Moved,
}

/// A followed room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Followed {
    /// The last seq delivered.
    cursor: Seq,
    /// The SYNC currently catching the room up, if any.
    syncing: Option<u32>,
    /// The highest seq dropped while syncing because it skipped ahead (0: none).
    missed: Seq,
}

/// One client connection's protocol state; see the module doc.
#[derive(Debug)]
pub struct Session {
    /// What the session was created with.
    config: SessionConfig,
    /// Splits frames off `inbuf`; its maximum is `config.max_frame`.
    decoder: FrameDecoder,
    /// Bytes received but not yet a whole frame.
    inbuf: BytesMut,
    /// Encoded frames for the driver to write; `out[out_pos..]` is still unwritten.
    out: Vec<u8>,
    /// How much of `out` the driver has written.
    out_pos: usize,
    /// The last request id handed out.
    last_id: u32,
    /// Requests awaiting a reply, by id.
    pending: HashMap<u32, Pending>,
    /// Per SYNC request still running, where each of its rooms stands.
    syncs: HashMap<u32, HashMap<RoomId, SyncRoom>>,
    /// Followed rooms by id.
    rooms: BTreeMap<RoomId, Followed>,
    /// Events not yet taken.
    events: VecDeque<Event>,
    /// The server's `WELCOME`, once it came.
    welcome: Option<Welcome>,
    /// The largest length field the server accepts (its `max_frame`).
    max_out: u32,
    /// The server's heartbeat interval, once known (none if it announced 0).
    heartbeat: Option<Duration>,
    /// When the server was last heard from.
    last_heard: Instant,
    /// Whether a heartbeat `PING` went out since the server was last heard from.
    pinging: bool,
    /// The nonce of the next heartbeat `PING`.
    next_nonce: u64,
    /// The server's `GOODBYE`, once it came; nothing after it is read.
    goodbye: Option<Goodbye>,
    /// Why the session is over, once it is.
    closed: Option<SessionError>,
}

impl Session {
    /// A new session whose `HELLO` (request [`HELLO_ID`]) is already queued for writing.
    pub fn new(config: SessionConfig, now: Instant) -> Session {
        let hello = ClientFrame::Hello(Hello {
            magic: MAGIC,
            max_version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
            client_name: config.client_name.clone(),
            client_version: config.client_version.clone(),
        });
        let mut session = Session {
            decoder: FrameDecoder::new(config.max_frame),
            config,
            inbuf: BytesMut::new(),
            out: Vec::new(),
            out_pos: 0,
            last_id: 0,
            pending: HashMap::new(),
            syncs: HashMap::new(),
            rooms: BTreeMap::new(),
            events: VecDeque::new(),
            welcome: None,
            max_out: DEFAULT_MAX_FRAME,
            heartbeat: None,
            last_heard: now,
            pinging: false,
            next_nonce: 1,
            goodbye: None,
            closed: None,
        };
        if let Err(e) = session.request(&hello, false) {
            // Only a client name and version of about a megabyte could make a HELLO too large.
            session.close(e);
        }
        session
    }

    /// The configuration the session was created with.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// The server's `WELCOME`, once the handshake is done.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// The server's `GOODBYE`, if it sent one.
    pub fn goodbye(&self) -> Option<&Goodbye> {
        self.goodbye.as_ref()
    }

    /// Why the session is over (end of stream, a fatal framing error, a refused handshake, a
    /// silent server); `None` while it is open.
    pub fn closed(&self) -> Option<&SessionError> {
        self.closed.as_ref()
    }

    /// Whether request `request_id` still awaits its (final) reply.
    pub fn is_pending(&self, request_id: u32) -> bool {
        self.pending.contains_key(&request_id)
    }

    /// How many requests await their reply, the session's own included.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Queues a request under the next request id and returns the id. The reply comes back as
    /// an [`Event`] carrying it. A `PONG` awaits nothing.
    ///
    /// Refused without queueing anything: a frame longer than the server accepts
    /// ([`SessionError::Protocol`]; the server would drop the connection for it) or than any frame
    /// may be ([`SessionError::Encode`]), and anything once the session is closed.
    pub fn send(&mut self, frame: &ClientFrame) -> Result<u32, SessionError> {
        self.request(frame, false)
    }

    /// Unwritten output: whole encoded frames, oldest first, possibly after a partial write.
    pub fn pending_output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// Whether output waits to be written.
    pub fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Records that the first `n` bytes of [`Session::pending_output`] were written.
    pub fn consume_output(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos >= COMPACT_AT && self.out_pos * 2 >= self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Takes bytes read from the server: splits off every whole frame and acts on it. Bytes that
    /// do not yet make a frame wait for more. Any byte counts as a sign of life.
    pub fn handle_bytes(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() || self.closed.is_some() || self.goodbye.is_some() {
            return;
        }
        self.heard(now);
        self.inbuf.extend_from_slice(bytes);
        loop {
            match self.decoder.decode(&mut self.inbuf) {
                Ok(Some(raw)) => self.on_frame(raw),
                Ok(None) => break,
                Err(e) => {
                    // Frame boundaries are lost (every decoder error is a framing one here).
                    self.events.push_back(Event::Invalid { request_id: 0, error: SessionError::Decode(e.clone()) });
                    self.close(SessionError::Decode(e));
                }
            }
            if self.closed.is_some() || self.goodbye.is_some() {
                // Nothing follows a GOODBYE, and nothing can be trusted after a framing error.
                self.inbuf.clear();
                break;
            }
        }
    }

    /// Takes one frame the driver split off the stream itself.
    pub fn handle_frame(&mut self, raw: RawFrame, now: Instant) {
        if self.closed.is_some() || self.goodbye.is_some() {
            return;
        }
        self.heard(now);
        self.on_frame(raw);
    }

    /// The server closed the stream. Events already queued stay available; the session is closed
    /// with [`SessionError::Closed`] (`None`: the `GOODBYE`, if any, was its own event).
    pub fn handle_eof(&mut self) {
        if self.closed.is_none() {
            self.close(SessionError::Closed(None));
        }
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::on_tick`] next has something to do; `None` while there is no heartbeat
    /// (before the `WELCOME`, if the server announced none, after a `GOODBYE`, once closed).
    pub fn next_tick(&self) -> Option<Instant> {
        if self.closed.is_some() || self.goodbye.is_some() {
            return None;
        }
        let interval = self.heartbeat?;
        Some(self.last_heard + if self.pinging { interval * 3 } else { interval })
    }

    /// The heartbeat: pings a server silent for one interval, declares one silent for three
    /// dead (closing the session). Calling it early or often is harmless.
    pub fn on_tick(&mut self, now: Instant) -> Tick {
        if self.closed.is_some() {
            return Tick::Dead;
        }
        let Some(interval) = self.heartbeat else { return Tick::Alive };
        if self.goodbye.is_some() {
            return Tick::Alive;
        }
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= interval * 3 {
            self.close(SessionError::Silent(silent));
            return Tick::Dead;
        }
        if silent >= interval && !self.pinging {
            let nonce = self.next_nonce;
            self.next_nonce = self.next_nonce.wrapping_add(1);
            if self.request(&ClientFrame::Ping(Ping { nonce }), true).is_ok() {
                self.pinging = true;
                return Tick::Pinged;
            }
        }
        Tick::Alive
    }

    /// Follows `room` from `cursor` (the last seq the caller holds; 0 for none): from now on its
    /// deltas arrive as [`Event::Delta`]s exactly once and in order, and gaps are filled by SYNCs
    /// the session sends itself. Following a followed room again resets its cursor.
    ///
    /// Pushes of `room` that arrived before this call and still wait in the events were passed
    /// on unjudged; they are judged again now, so that none can jump ahead of the catch-up.
    pub fn follow(&mut self, room: impl Into<RoomId>, cursor: impl Into<Seq>) {
        let (room, cursor) = (room.into(), cursor.into());
        self.rooms.insert(room, Followed { cursor, syncing: None, missed: Seq::ZERO });
        if !self.events.iter().any(|e| matches!(e, Event::Delta { delta, sync: None } if delta.room == room)) {
            return;
        }
        for event in std::mem::take(&mut self.events) {
            match event {
                Event::Delta { delta, sync: None } if delta.room == room => self.accept(delta, None),
                other => self.events.push_back(other),
            }
        }
    }

    /// Stops following `room`; returns its cursor if it was followed.
    pub fn unfollow(&mut self, room: impl Into<RoomId>) -> Option<Seq> {
        self.rooms.remove(&room.into()).map(|f| f.cursor)
    }

    /// The cursor of a followed room: the last seq delivered.
    pub fn cursor(&self, room: impl Into<RoomId>) -> Option<Seq> {
        self.rooms.get(&room.into()).map(|f| f.cursor)
    }

    /// The cursors of every followed room, by room id: what to follow again on a new connection.
    pub fn cursors(&self) -> Vec<RoomCursor> {
        self.rooms.iter().map(|(&room, f)| RoomCursor { room, seq: f.cursor }).collect()
    }

    /// Sends one `SYNC` of every followed room that no SYNC is catching up yet, from its cursor,
    /// and returns its id (`None` when there is no such room). Its pages' deltas arrive as
    /// [`Event::Delta`]s; its `SYNC_DONE` or `ERROR` as for any request.
    pub fn sync_followed(&mut self) -> Result<Option<u32>, SessionError> {
        let rooms: Vec<RoomCursor> = self
            .rooms
            .iter()
            .filter(|(_, f)| f.syncing.is_none())
            .map(|(&room, f)| RoomCursor { room, seq: f.cursor })
            .collect();
        if rooms.is_empty() {
            return Ok(None);
        }
        let sync = ClientFrame::Sync(Sync { rooms, page_size: self.config.sync_page_size });
        self.request(&sync, false).map(Some)
    }

    /// The next request id: never 0, never one still awaiting its reply.
    fn next_id(&mut self) -> u32 {
        loop {
            self.last_id = match self.last_id.wrapping_add(1) {
                0 => 1,
                id => id,
            };
            if !self.pending.contains_key(&self.last_id) {
                return self.last_id;
            }
        }
    }

    /// Queues a request, the caller's or (`internal`) the session's own.
    fn request(&mut self, frame: &ClientFrame, internal: bool) -> Result<u32, SessionError> {
        if let Some(why) = &self.closed {
            return Err(why.clone());
        }
        let id = self.next_id();
        self.enqueue(frame, id)?;
        match frame {
            // Not answered: nothing to wait for.
            ClientFrame::Pong(_) | ClientFrame::DownloadAck(_) => {}
            ClientFrame::Sync(sync) => {
                self.start_sync(id, &sync.rooms);
                self.pending.insert(id, Pending { ty: FrameType::SYNC, internal });
            }
            other => {
                self.pending.insert(id, Pending { ty: other.frame_type(), internal });
            }
        }
        Ok(id)
    }

    /// Appends one encoded frame to the output, or nothing if it is too large.
    fn enqueue(&mut self, frame: &ClientFrame, request_id: u32) -> Result<(), SessionError> {
        let start = self.out.len();
        frame.encode_into(&mut self.out, request_id)?;
        let len = self.out.len() - start - 4;
        if len > self.max_out as usize {
            self.out.truncate(start);
            return Err(SessionError::Protocol(format!(
                "{} frame of {len} bytes exceeds the server's maximum of {}",
                frame.frame_type(),
                self.max_out
            )));
        }
        Ok(())
    }

    fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
        self.pinging = false;
    }

    fn close(&mut self, why: SessionError) {
        self.closed = Some(why);
        self.pending.clear();
        self.syncs.clear();
        self.out.clear();
        self.out_pos = 0;
        for f in self.rooms.values_mut() {
            f.syncing = None;
            f.missed = Seq::ZERO;
        }
    }

    /// Acts on one whole frame.
    fn on_frame(&mut self, raw: RawFrame) {
        let frame = match ServerFrame::decode(&raw) {
            Ok(frame) => frame,
            Err(e) => {
                // A reply that cannot be read still ends its request (a SYNC goes on: more
                // pages may come).
                if raw.request_id != 0 && !raw.ty.is_push() {
                    if let Some(p) = self.pending.get(&raw.request_id) {
                        if p.ty != FrameType::SYNC {
                            self.pending.remove(&raw.request_id);
                        }
                    }
                }
                self.events.push_back(Event::Invalid { request_id: raw.request_id, error: e.into() });
                return;
            }
        };
        match frame {
            // The PONG echoes the PING's request id (servers send 0) and nonce. It is a few bytes,
            // so it cannot be too large.
            ServerFrame::Ping(ping) => {
                let _ = self.enqueue(&ClientFrame::Pong(ping), raw.request_id);
            }
            ServerFrame::Goodbye(goodbye) => {
                self.goodbye = Some(goodbye.clone());
                self.events.push_back(Event::Goodbye(goodbye));
            }
            ServerFrame::Delta(delta) => self.accept(delta, None),
            ServerFrame::Error(error) => self.on_error(raw.request_id, error),
            // Its type says it answers no request, whatever its request id.
            push if raw.ty.is_push() => self.events.push_back(Event::Push(push)),
            reply => self.on_reply(raw.request_id, reply),
        }
    }

    fn on_error(&mut self, request_id: u32, error: ErrorBody) {
        if let Some(p) = self.pending.remove(&request_id) {
            if p.ty == FrameType::SYNC {
                self.end_sync(request_id);
            }
        }
        self.events.push_back(Event::Failed { request_id, error });
    }

    fn on_reply(&mut self, request_id: u32, frame: ServerFrame) {
        let Some(&Pending { ty, internal }) = self.pending.get(&request_id) else {
            let why = format!("{} for request {request_id}, which awaits no reply", frame.frame_type());
            self.events.push_back(Event::Invalid { request_id, error: SessionError::Protocol(why) });
            return;
        };
        if ty == FrameType::SYNC {
            match frame {
                ServerFrame::DeltaPage(page) => self.on_sync_page(request_id, internal, page),
                ServerFrame::SyncDone(done) => self.on_sync_done(request_id, internal, done),
                other => {
                    self.pending.remove(&request_id);
                    self.end_sync(request_id);
                    let why = format!("expected DELTA_PAGE or SYNC_DONE, got {}", other.frame_type());
                    self.events.push_back(Event::Invalid { request_id, error: SessionError::Protocol(why) });
                }
            }
            return;
        }
        self.pending.remove(&request_id);
        if let Some(wanted) = expected_reply(ty) {
            if frame.frame_type() != wanted {
                let why = format!("expected {wanted}, got {}", frame.frame_type());
                self.events.push_back(Event::Invalid { request_id, error: SessionError::Protocol(why) });
                return;
            }
        }
        match frame {
            ServerFrame::Welcome(welcome) if ty == FrameType::HELLO => self.on_welcome(request_id, welcome),
            _ if internal => {}
            frame => self.events.push_back(Event::Reply { request_id, frame }),
        }
    }

    fn on_welcome(&mut self, request_id: u32, welcome: Welcome) {
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&welcome.protocol_version) {
            let why = SessionError::Protocol(format!(
                "the server answered HELLO with protocol version {}; this client speaks \
                 {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
                welcome.protocol_version
            ));
            self.events.push_back(Event::Invalid { request_id, error: why.clone() });
            self.close(why);
            return;
        }
        self.max_out = welcome.limits.max_frame;
        let beat = welcome.limits.heartbeat_secs;
        self.heartbeat = (beat > 0).then(|| Duration::from_secs(u64::from(beat)));
        self.welcome = Some(welcome.clone());
        self.events.push_back(Event::Connected(welcome));
    }

    /// Starts tracking SYNC `id` of `cursors` (the first cursor of a room counts, as on the server).
    fn start_sync(&mut self, id: u32, cursors: &[RoomCursor]) {
        let mut track = HashMap::with_capacity(cursors.len());
        for c in cursors {
            if track.contains_key(&c.room) {
                continue;
            }
            // The server moves the room from any earlier, unfinished SYNC to this one.
            for earlier in self.syncs.values_mut() {
                if let Some(state) = earlier.get_mut(&c.room) {
                    *state = SyncRoom::Moved;
                }
            }
            track.insert(c.room, SyncRoom::After(c.seq));
            if let Some(f) = self.rooms.get_mut(&c.room) {
                f.syncing = Some(id);
            }
        }
        self.syncs.insert(id, track);
    }

    /// SYNC `id` is over without (or before) its `SYNC_DONE`: an `ERROR`, or an invalid reply.
    /// Its rooms keep catching up as pushes on the server's side, gap-free from where their pages
    /// stopped, so they simply stop waiting for pages.
    fn end_sync(&mut self, id: u32) {
        if let Some(track) = self.syncs.remove(&id) {
            for room in track.keys() {
                if let Some(f) = self.rooms.get_mut(room) {
                    if f.syncing == Some(id) {
                        f.syncing = None;
                    }
                }
            }
        }
    }

    fn on_sync_page(&mut self, id: u32, internal: bool, mut page: DeltaPage) {
        let room = page.room;
        let state = self.syncs.get(&id).and_then(|track| track.get(&room)).copied();
        let after = match state {
            Some(SyncRoom::After(after)) => after,
            Some(SyncRoom::Moved) => {
                if !internal {
                    self.events.push_back(Event::Reply { request_id: id, frame: ServerFrame::DeltaPage(page) });
                }
                return;
            }
            Some(SyncRoom::Final) => {
                return self.bad_page(id, room, format!("DELTA_PAGE for room {room} after its final page"));
            }
            None => {
                return self.bad_page(id, room, format!("DELTA_PAGE for room {room}, which the SYNC did not name"));
            }
        };
        if let Err(why) = check_page(after, &page) {
            return self.bad_page(id, room, why);
        }
        let next = if page.more { SyncRoom::After(page.resume_after) } else { SyncRoom::Final };
        if let Some(state) = self.syncs.get_mut(&id).and_then(|track| track.get_mut(&room)) {
            *state = next;
        }
        let deltas = match (self.rooms.contains_key(&room), internal) {
            (false, _) => Vec::new(),
            (true, true) => std::mem::take(&mut page.deltas),
            (true, false) => page.deltas.clone(),
        };
        let more = page.more;
        if !internal {
            self.events.push_back(Event::Reply { request_id: id, frame: ServerFrame::DeltaPage(page) });
        }
        for delta in deltas {
            self.accept(delta, Some(id));
        }
        if !more {
            self.room_synced(room, id);
        }
    }

    /// A SYNC page broke the rules: report it and stop tracking the room in that SYNC. A followed
    /// room stops waiting for it; a later push shows whether anything is missing.
    fn bad_page(&mut self, id: u32, room: RoomId, why: String) {
        if let Some(state) = self.syncs.get_mut(&id).and_then(|track| track.get_mut(&room)) {
            *state = SyncRoom::Final;
        }
        if let Some(f) = self.rooms.get_mut(&room) {
            if f.syncing == Some(id) {
                f.syncing = None;
            }
        }
        self.events.push_back(Event::Invalid { request_id: id, error: SessionError::Protocol(why) });
    }

    /// `room` had the final page of SYNC `id`: pushes continue from here. If one that skipped
    /// ahead was dropped meanwhile and the pages stopped short of it, ask again.
    fn room_synced(&mut self, room: RoomId, id: u32) {
        let Some(f) = self.rooms.get_mut(&room) else { return };
        if f.syncing != Some(id) {
            return;
        }
        f.syncing = None;
        let missed = std::mem::take(&mut f.missed);
        let cursor = f.cursor;
        if missed > cursor {
            self.gap(room, cursor, missed);
        }
    }

    fn on_sync_done(&mut self, id: u32, internal: bool, done: SyncDone) {
        self.pending.remove(&id);
        let track = self.syncs.remove(&id).unwrap_or_default();
        // Rooms that got no final page (the user is not a member) stop waiting.
        for (room, state) in &track {
            if let SyncRoom::After(_) = state {
                if let Some(f) = self.rooms.get_mut(room) {
                    if f.syncing == Some(id) {
                        f.syncing = None;
                    }
                }
            }
        }
        // A head beyond the cursor means a push after the final page was lost. Only checked for
        // the caller's SYNCs, so that a server reporting wrong heads cannot make the session SYNC
        // in a loop.
        let mut gaps = Vec::new();
        if !internal {
            for head in &done.heads {
                if track.get(&head.room) != Some(&SyncRoom::Final) {
                    continue;
                }
                if let Some(f) = self.rooms.get(&head.room) {
                    if f.syncing.is_none() && head.seq > f.cursor {
                        gaps.push((head.room, f.cursor, head.seq));
                    }
                }
            }
            self.events.push_back(Event::Reply { request_id: id, frame: ServerFrame::SyncDone(done) });
        }
        for (room, cursor, seq) in gaps {
            self.gap(room, cursor, seq);
        }
    }

    /// Judges again a push the caller took from the events before its room was followed (a push
    /// that arrived between login and [`Session::follow`] was passed on unjudged): it is delivered
    /// if it continues the room's cursor, dropped if it is old, or the gap before it SYNCed.
    pub fn replay_push(&mut self, delta: Delta) {
        self.accept(delta, None);
    }

    /// Judges a delta from a push (`via` none) or a SYNC page against its room's cursor.
    fn accept(&mut self, delta: Delta, via: Option<u32>) {
        let Some(f) = self.rooms.get_mut(&delta.room) else {
            if via.is_none() {
                self.events.push_back(Event::Delta { delta, sync: None });
            }
            return;
        };
        if delta.seq <= f.cursor {
            return;
        }
        if delta.seq.prev() == f.cursor {
            f.cursor = delta.seq;
            self.events.push_back(Event::Delta { delta, sync: via });
            return;
        }
        if f.syncing.is_some() {
            f.missed = f.missed.max(delta.seq);
            return;
        }
        let cursor = f.cursor;
        self.gap(delta.room, cursor, delta.seq);
    }

    /// Deltas after `cursor` are missing in `room` (`seq` arrived): SYNC the room.
    fn gap(&mut self, room: RoomId, cursor: Seq, seq: Seq) {
        let sync = ClientFrame::Sync(Sync {
            rooms: vec![RoomCursor { room, seq: cursor }],
            page_size: self.config.sync_page_size,
        });
        let resync = self.request(&sync, true).ok();
        self.events.push_back(Event::Gap { room, cursor, seq, resync });
    }
}

/// Checks that a SYNC page continues its room right after `after` and ends at `resume_after`.
fn check_page(after: Seq, page: &DeltaPage) -> Result<(), String> {
    let mut last = after;
    for delta in &page.deltas {
        if delta.room != page.room {
            return Err(format!("DELTA_PAGE for room {} holds a delta of room {}", page.room, delta.room));
        }
        if delta.seq.get().checked_sub(1) != Some(last.get()) {
            return Err(format!("room {} delta seq {} does not follow {last}", delta.room, delta.seq));
        }
        last = delta.seq;
    }
    if page.resume_after != last {
        return Err(format!(
            "room {} DELTA_PAGE resume_after {} is not its last seq {last}",
            page.room, page.resume_after
        ));
    }
    Ok(())
}

/// The reply type a request expects on success (any request may instead be answered `ERROR`);
/// `None` for a type this table does not know, whose reply is passed on as it is. SYNC, with its
/// several replies, is handled apart.
fn expected_reply(request: FrameType) -> Option<FrameType> {
    Some(match request {
        FrameType::HELLO => FrameType::WELCOME,
        FrameType::PING => FrameType::SERVER_PONG,
        FrameType::REGISTER | FrameType::LOGIN | FrameType::RESUME => FrameType::AUTHED,
        FrameType::LOGOUT | FrameType::LEAVE_ROOM => FrameType::DONE,
        FrameType::LIST_SESSIONS => FrameType::SESSION_LIST,
        FrameType::REVOKE_SESSIONS => FrameType::SESSIONS_REVOKED,
        FrameType::CREATE_ROOM | FrameType::JOIN_ROOM | FrameType::OPEN_DIRECT | FrameType::CREATE_CHANNEL => {
            FrameType::ROOM_INFO
        }
        FrameType::CREATE_SERVER | FrameType::JOIN_SERVER => FrameType::SERVER_INFO,
        FrameType::LIST_SERVERS => FrameType::SERVER_LIST,
        FrameType::RECEIPT => FrameType::READ_STATE,
        FrameType::TYPING | FrameType::SET_PRESENCE => FrameType::DONE,
        FrameType::WATCH_PRESENCE => FrameType::PRESENCE_LIST,
        FrameType::UNREAD => FrameType::UNREAD_LIST,
        FrameType::NOTIFICATIONS => FrameType::NOTIFICATION_LIST,
        FrameType::LEAVE_SERVER | FrameType::SET_SERVER_ROLE | FrameType::DEFINE_SERVER_ROLE => FrameType::DONE,
        FrameType::LIST_ROOMS => FrameType::ROOM_LIST,
        FrameType::LIST_MEMBERS => FrameType::MEMBER_LIST,
        FrameType::GET_ROOM => FrameType::ROOM_DETAILS,
        FrameType::WHOAMI => FrameType::IDENTITY,
        FrameType::POST
        | FrameType::EDIT
        | FrameType::DELETE
        | FrameType::REACT
        | FrameType::REPLY
        | FrameType::PIN
        | FrameType::MODERATE
        | FrameType::DEFINE_ROLE
        | FrameType::CALL => FrameType::POSTED,
        FrameType::VIEW | FrameType::SEARCH => FrameType::MESSAGE_PAGE,
        FrameType::RESTORE => FrameType::RESTORE_PAGE,
        FrameType::GET_PROFILE | FrameType::UPDATE_PROFILE => FrameType::PROFILE,
        FrameType::GET_SETTINGS => FrameType::SETTINGS,
        FrameType::SET_SETTING => FrameType::SETTING,
        FrameType::HISTORY => FrameType::DELTA_PAGE,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
