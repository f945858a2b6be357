//! The server core: every connection's protocol state, driven by frames, completions and time,
//! with no I/O of its own.
//!
//! The event loop (`server`) owns sockets and moves bytes. For each decoded frame it calls
//! [`Core::frame`]; for each batch of worker results [`Core::completion`]; once a second
//! [`Core::tick`]; when a socket ends [`Core::closed`]. The core answers through the [`Io`] trait:
//! queue bytes on a connection, say goodbye, submit a job, ask the loop to read a connection again.
//! Time is always passed in ([`Now`]), never read here. So the core runs unchanged against a fake
//! `Io` in memory, which is how `core::tests` drives the races that end-to-end runs only hit by
//! chance (the style of quinn-proto, and of `sync.rs`).
//!
//! What the core keeps per connection ([`Link`]): where it is (handshake, logged out, logging in,
//! logged in as whom with which session), its rooms, its SYNC state, its requests in flight (with
//! a smaller window on the shared queue, and the request parked behind a full window), its
//! heartbeat clock. Who receives which room's pushes is the [`hub::Hub`]'s.
//!
//! Requests are admitted by their handlers (`handlers`); the core only applies the connection's
//! state rules (the per-state table of docs/protocol.md) before handing a frame to them, and
//! carries out the effects the workers return.

mod files;
pub mod hub;
pub mod presence;

use crate::config::Config;
use crate::handlers::{self, accounts, Admitted, Ctx, Ephemeral, Limiters, Who};
use crate::limits::{HANDSHAKE_SECS, MAX_IN_FLIGHT, SHARED_WINDOW, TOUCH_LIVE_EVERY};
use crate::sync::{Action, FetchId, SyncState};
use crate::transport::Class;
use crate::work::{Actor, Completion, ConnRef, Effect, EncodeReply, PageFailure, Published, ReplyTo, Work};
use bytes::Bytes;
use chime_protocol::{
    ClientFrame, DecodeError, ErrorBody, ErrorCode, FrameType, HelloPrefix, Ping, PresenceEntry, PresenceList,
    RawFrame, Seq, ServerFrame, TypingNow, Welcome, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use chime_storage::{RoomId, SessionId, SessionLimits, UserId};
use hub::{Change, Hub, Key};
use std::net::IpAddr;
use std::time::Instant;

/// Why a request with id 0 is refused.
const REQUEST_ID_ZERO: &str = "request id 0 is reserved for the server's pushes; number requests from 1";
/// Why a HELLO after the handshake is refused.
const HELLO_AGAIN: &str = "HELLO was already received; ignored";

/// The time, as the loop read it once for this turn.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Whole seconds since the loop started (heartbeat and timeout clock).
    pub secs: u32,
    /// The monotonic clock (rate limits).
    pub instant: Instant,
    /// The wall clock, Unix milliseconds (session lifetimes).
    pub ms: i64,
}

/// How a GOODBYE treats what is already queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bye {
    /// Replaces it (the client fell behind, timed out, or lost its session): `resync` says
    /// whether pushes were dropped.
    Replace {
        /// Tell the client to SYNC after reconnecting.
        resync: bool,
    },
    /// Goes after it (an ERROR that explains the GOODBYE, replies owed at shutdown).
    AfterQueue,
}

/// What the core needs from the loop.
pub trait Io {
    /// Queues bytes on a connection. A queue that overflows ends the connection with a resync.
    fn send(&mut self, key: Key, bytes: Bytes, class: Class);
    /// Bytes queued on a connection and not yet written (SYNC flow control).
    fn queued(&self, key: Key) -> usize;
    /// Sends GOODBYE and closes once it is written.
    fn goodbye(&mut self, key: Key, code: ErrorCode, message: &str, bye: Bye);
    /// Closes once everything queued is written, without a GOODBYE (the client half-closed).
    fn finish(&mut self, key: Key);
    /// Closes now (a connection that never completed its handshake).
    fn close(&mut self, key: Key);
    /// Hands a job to the workers; false when its queue is full.
    fn submit(&mut self, work: Work) -> bool;
    /// Whether the database is down (store work is refused at once meanwhile).
    fn db_down(&self) -> bool;
    /// Read and decode this connection's frames again: what they waited for is done.
    fn wake(&mut self, key: Key);
}

/// What the loop does after handing the core a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Decode the next frame.
    Continue,
    /// Leave the rest buffered until [`Io::wake`] (a login or a parked request is pending, the
    /// connection has its maximum in flight, or it is closing).
    Stop,
}

/// Where a connection is in its life.
#[derive(Debug, Clone)]
enum Phase {
    /// Waiting for HELLO.
    Handshake,
    /// Handshake done, not logged in.
    Open,
    /// A login is with the workers; frames after it wait.
    Authenticating,
    /// Logged in.
    Authed(Box<Authed>),
}

/// A [`Phase`] without its data, to match on while the core is borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshake,
    Open,
    Authenticating,
    Authed,
}

impl State {
    fn of(phase: &Phase) -> State {
        match phase {
            Phase::Handshake => State::Handshake,
            Phase::Open => State::Open,
            Phase::Authenticating => State::Authenticating,
            Phase::Authed(_) => State::Authed,
        }
    }
}

/// A logged-in connection's identity.
#[derive(Debug, Clone)]
struct Authed {
    who: Who,
    /// When the session was created (Unix ms): it ends at its absolute lifetime.
    session_created_ms: i64,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Link {
    /// Identity across slot reuse.
    id: ConnRef,
    /// The peer's address (rate limits, sessions).
    peer: IpAddr,
    phase: Phase,
    /// Rooms whose pushes it receives, ascending.
    rooms: Vec<RoomId>,
    /// SYNC and catch-up state, created on first use.
    sync: Option<Box<SyncState>>,
    /// When (loop seconds) a frame last arrived.
    last_heard: u32,
    /// When it last entered an unauthenticated state; it must log in within the auth timeout.
    unauth_since: u32,
    /// A PING is outstanding.
    ping_sent: bool,
    /// Jobs with the workers, and of those on the shared queue.
    inflight: u32,
    shared_inflight: u32,
    /// A shared job waiting for a slot of the window.
    parked: Option<Work>,
    /// Logins and room creations in flight: request id and the hub stamp they began at.
    pending: Vec<(u32, u64)>,
    /// The core ended the connection (a GOODBYE is on its way).
    ending: bool,
    /// The client half-closed: finish what is owed, then close.
    half_closed: bool,
    /// Open uploads, downloads streaming, the upload window.
    transfers: files::Transfers,
}

impl Link {
    fn who(&self) -> Option<&Who> {
        match &self.phase {
            Phase::Authed(a) => Some(&a.who),
            _ => None,
        }
    }
}

/// The server core.
pub struct Core {
    config: Config,
    /// When sessions expire.
    session_limits: SessionLimits,
    /// Links by connection key.
    links: Vec<Option<Link>>,
    hub: Hub,
    /// Presence and typing (ephemeral, never stored).
    presence: presence::Presence,
    /// Users who went offline where no `Io` was at hand (a closed socket): pushed at the next
    /// tick.
    went_offline: Vec<PresenceEntry>,
    limiters: Limiters,
    /// Sessions whose connections closed: their last use is recorded in one job per turn.
    touched: Vec<SessionId>,
    /// New requests are refused (the server is stopping).
    shutting_down: bool,
}

impl Core {
    /// A core for `config`.
    pub fn new(config: Config, now: Instant) -> Core {
        let session_limits = session_limits(&config);
        Core {
            limiters: Limiters::new(&config, now),
            config,
            session_limits,
            links: Vec::new(),
            hub: Hub::default(),
            presence: presence::Presence::default(),
            went_offline: Vec::new(),
            touched: Vec::new(),
            shutting_down: false,
        }
    }

    /// The hub, for tests and stats.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    fn link(&mut self, key: Key) -> Option<&mut Link> {
        self.links.get_mut(key).and_then(Option::as_mut)
    }

    /// The live link a completion is for (the same connection, not a later one in its slot).
    fn link_of(&mut self, r: ConnRef) -> Option<&mut Link> {
        self.link(r.key).filter(|l| l.id == r)
    }

    /// A connection was accepted.
    pub fn open(&mut self, id: ConnRef, peer: IpAddr, now: Now) {
        if self.links.len() <= id.key {
            self.links.resize_with(id.key + 1, || None);
        }
        self.links[id.key] = Some(Link {
            id,
            peer,
            phase: Phase::Handshake,
            rooms: Vec::new(),
            sync: None,
            last_heard: now.secs,
            unauth_since: now.secs,
            ping_sent: false,
            inflight: 0,
            shared_inflight: 0,
            parked: None,
            pending: Vec::new(),
            ending: false,
            half_closed: false,
            transfers: files::Transfers::default(),
        });
    }

    /// Whether any connection still waits for the workers (graceful shutdown waits for them).
    pub fn busy(&self) -> bool {
        self.links.iter().flatten().any(|l| l.inflight > 0 || l.parked.is_some())
    }

    /// The server is stopping: new requests are refused `SHUTTING_DOWN`.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    /// Whether a connection may have more frames decoded now.
    fn flow(&self, key: Key) -> Flow {
        let Some(link) = self.links.get(key).and_then(Option::as_ref) else { return Flow::Stop };
        let waits = link.ending
            || link.parked.is_some()
            || link.inflight >= MAX_IN_FLIGHT
            || link.transfers.window_full()
            || matches!(link.phase, Phase::Authenticating);
        if waits {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// A frame arrived on connection `key`.
    pub fn frame(&mut self, io: &mut dyn Io, key: Key, raw: RawFrame, now: Now) -> Flow {
        let rid = raw.request_id;
        let Some(link) = self.link(key) else { return Flow::Stop };
        link.last_heard = now.secs;
        link.ping_sent = false;
        if matches!(link.phase, Phase::Handshake) {
            self.handshake(io, key, &raw);
            return self.flow(key);
        }
        // Checked before the body: a second HELLO is refused as such whatever it carries.
        if raw.ty == FrameType::HELLO {
            error(io, key, rid, ErrorCode::HANDSHAKE_COMPLETE, HELLO_AGAIN);
            return self.flow(key);
        }
        // Request id 0 marks the server's pushes; a reply to it could not be told from one.
        // PONG answers SERVER_PING, which carries 0, so it echoes 0.
        if rid == 0 && raw.ty != FrameType::PONG {
            error(io, key, rid, ErrorCode::BAD_FRAME, REQUEST_ID_ZERO);
            return self.flow(key);
        }
        let frame = match ClientFrame::decode(&raw) {
            Ok(f) => f,
            Err(e) => {
                let code = match e {
                    DecodeError::UnknownType(_) => ErrorCode::UNKNOWN_TYPE,
                    _ => ErrorCode::BAD_FRAME,
                };
                error(io, key, rid, code, &e.to_string());
                return self.flow(key);
            }
        };
        self.frame_in_phase(io, key, rid, frame, now);
        self.flow(key)
    }

    /// The connection-state rules of docs/protocol.md, then the handlers.
    fn frame_in_phase(&mut self, io: &mut dyn Io, key: Key, rid: u32, frame: ClientFrame, now: Now) {
        let Some(link) = self.link(key) else { return };
        let phase = State::of(&link.phase);
        match (phase, frame) {
            // Not reached: `frame` handles the handshake and a second HELLO before decoding.
            (State::Handshake, _) => {
                self.fatal(io, key, rid, ErrorCode::HANDSHAKE_REQUIRED, "the first frame must be HELLO")
            }
            (_, ClientFrame::Hello(_)) => error(io, key, rid, ErrorCode::HANDSHAKE_COMPLETE, HELLO_AGAIN),
            (_, ClientFrame::Ping(p)) => io.send(key, ServerFrame::Pong(p).reply(rid), Class::Own),
            (_, ClientFrame::Pong(_)) => {}
            _ if self.shutting_down => {
                error(io, key, rid, ErrorCode::SHUTTING_DOWN, "server shutting down; retry after reconnecting")
            }
            (State::Open, ClientFrame::Register(c)) => self.log_in(io, key, rid, LoginKind::Password(true, c), now),
            (State::Open, ClientFrame::Login(c)) => self.log_in(io, key, rid, LoginKind::Password(false, c), now),
            (State::Open, ClientFrame::Resume(r)) => self.log_in(io, key, rid, LoginKind::Resume(r), now),
            (State::Authenticating, _) => {
                // Not reached: frames behind a login wait (`Flow::Stop`) until it is done.
                error(io, key, rid, ErrorCode::NOT_AUTHENTICATED, "a login is in progress on this connection")
            }
            (State::Authed, ClientFrame::Register(_) | ClientFrame::Login(_) | ClientFrame::Resume(_)) => {
                error(io, key, rid, ErrorCode::ALREADY_AUTHENTICATED, "already logged in")
            }
            (State::Open, _) => error(io, key, rid, ErrorCode::NOT_AUTHENTICATED, "log in first"),
            (State::Authed, frame) => self.request(io, key, rid, frame, now),
        }
    }

    /// The first frame of a connection (docs/protocol.md, "Handshake"): it must be a HELLO whose
    /// version range meets the server's. Every refusal here ends the connection.
    fn handshake(&mut self, io: &mut dyn Io, key: Key, raw: &RawFrame) {
        let rid = raw.request_id;
        if raw.ty != FrameType::HELLO {
            let message = format!("the first frame must be HELLO, not {}", raw.ty);
            return self.fatal(io, key, rid, ErrorCode::HANDSHAKE_REQUIRED, &message);
        }
        if rid == 0 {
            return self.fatal(io, key, rid, ErrorCode::BAD_FRAME, REQUEST_ID_ZERO);
        }
        // The magic and the newest version come first in every version's HELLO, so a client of
        // any version learns why it is refused.
        let Some(prefix) = HelloPrefix::peek(&raw.body) else {
            return self.fatal(io, key, rid, ErrorCode::BAD_FRAME, "HELLO does not decode");
        };
        if prefix.magic != MAGIC {
            let message = format!("not a Chime client: HELLO's magic is {:02x?}, not \"CHIM\"", prefix.magic);
            return self.fatal(io, key, rid, ErrorCode::HANDSHAKE_REQUIRED, &message);
        }
        let ours = format!("this server speaks protocol versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}");
        if prefix.max_version < MIN_PROTOCOL_VERSION {
            let message = format!("the client speaks protocol versions up to {}; {ours}", prefix.max_version);
            return self.fatal(io, key, rid, ErrorCode::VERSION_UNSUPPORTED, &message);
        }
        let h = match ClientFrame::decode(raw) {
            Ok(ClientFrame::Hello(h)) => h,
            Ok(_) => return self.fatal(io, key, rid, ErrorCode::HANDSHAKE_REQUIRED, "the first frame must be HELLO"),
            Err(e) => return self.fatal(io, key, rid, ErrorCode::BAD_FRAME, &format!("HELLO does not decode: {e}")),
        };
        if h.min_version > h.max_version {
            let message = format!("HELLO's min_version {} is above its max_version {}", h.min_version, h.max_version);
            return self.fatal(io, key, rid, ErrorCode::BAD_FRAME, &message);
        }
        if h.min_version > PROTOCOL_VERSION {
            let message = format!("the client speaks protocol versions {} to {}; {ours}", h.min_version, h.max_version);
            return self.fatal(io, key, rid, ErrorCode::VERSION_UNSUPPORTED, &message);
        }
        let Some(link) = self.link(key) else { return };
        log::debug!("{} speaks {} {}", link.peer, h.client_name, h.client_version);
        link.phase = Phase::Open;
        let welcome = Welcome {
            protocol_version: h.max_version.min(PROTOCOL_VERSION),
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            server_name: "chimed".into(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            limits: crate::limits::announced(self.config.max_frame, self.config.heartbeat_secs),
        };
        io.send(key, ServerFrame::Welcome(welcome).reply(rid), Class::Own);
    }

    /// An ERROR for the request, then a GOODBYE with the same reason, then close.
    fn fatal(&mut self, io: &mut dyn Io, key: Key, rid: u32, code: ErrorCode, message: &str) {
        error(io, key, rid, code, message);
        self.end(io, key, code, message, Bye::AfterQueue);
    }

    /// Ends a connection with a GOODBYE.
    fn end(&mut self, io: &mut dyn Io, key: Key, code: ErrorCode, message: &str, bye: Bye) {
        if let Some(link) = self.link(key) {
            if !link.ending {
                link.ending = true;
                io.goodbye(key, code, message, bye);
            }
        }
    }

    fn log_in(&mut self, io: &mut dyn Io, key: Key, rid: u32, kind: LoginKind, now: Now) {
        let Some(link) = self.link(key) else { return };
        let (to, peer) = (ReplyTo { conn: link.id, request_id: rid }, link.peer);
        let admitted = match kind {
            LoginKind::Password(register, c) => {
                accounts::password(to, peer, register, c, &mut self.limiters, now.instant)
            }
            LoginKind::Resume(r) => accounts::resume(to, peer, r, &mut self.limiters, now.instant),
        };
        match admitted {
            Ok(work) => {
                if let Some(link) = self.link(key) {
                    link.phase = Phase::Authenticating;
                }
                self.submit(io, key, rid, work, true);
            }
            Err(e) => io.send(key, ServerFrame::Error(e).reply(rid), Class::Own),
        }
    }

    /// A request of a logged-in connection: its handler admits it.
    fn request(&mut self, io: &mut dyn Io, key: Key, rid: u32, frame: ClientFrame, now: Now) {
        let Some(frame) = self.file_request(io, key, rid, frame) else { return };
        let subscribes = matches!(frame, ClientFrame::CreateRoom(_));
        let Some(link) = self.link(key) else { return };
        let Some(who) = link.who().cloned() else { return };
        let to = ReplyTo { conn: link.id, request_id: rid };
        // Lent to the handler, and put back after.
        let mut sync = link.sync.take();
        let (hub, links) = (&self.hub, &self.links);
        let online = |user: UserId| online_sessions(hub, links, user);
        let mut ctx = Ctx {
            to,
            who: &who,
            sync: &mut sync,
            online: &online,
            limiters: &mut self.limiters,
            config: &self.config,
            now: now.instant,
        };
        let admitted = handlers::admit(&mut ctx, frame);
        if let Some(link) = self.link(key) {
            link.sync = sync;
        }
        match admitted {
            Ok(Admitted::Work(work)) => self.submit(io, key, rid, work, subscribes),
            Ok(Admitted::Sync(actions)) => self.apply(io, key, actions),
            Ok(Admitted::Reply(frame)) => io.send(key, frame.reply(rid), Class::Own),
            Ok(Admitted::Ephemeral(e)) => self.ephemeral(io, key, rid, &who, e, now),
            Err(e) => io.send(key, ServerFrame::Error(e).reply(rid), Class::Own),
        }
    }

    /// Typing and presence: carried out on the loop, answered at once, pushed in the ephemeral
    /// class (see [`presence`]).
    fn ephemeral(&mut self, io: &mut dyn Io, key: Key, rid: u32, who: &Who, e: Ephemeral, now: Now) {
        let user = who.actor.user_id;
        let answer = match e {
            Ephemeral::Typing(room) => {
                let reads = self.link(key).is_some_and(|l| l.rooms.binary_search(&room).is_ok());
                if !reads {
                    let error = ErrorBody::new(ErrorCode::NOT_MEMBER, format!("not a member of room {room}"));
                    io.send(key, ServerFrame::Error(error).reply(rid), Class::Own);
                    return;
                }
                // Throttled notices are answered like the others: the client need not know.
                if self.presence.may_type(key, room, now.instant) {
                    let push =
                        ServerFrame::TypingNow(TypingNow { room, user_id: user, user: who.actor.name.to_string() })
                            .reply(0);
                    for &k in self.hub.subscribers(room) {
                        if k != key {
                            io.send(k, push.clone(), Class::Ephemeral);
                        }
                    }
                }
                ServerFrame::Done(chime_protocol::Empty {})
            }
            Ephemeral::SetPresence(status) => {
                if let Some(entry) = self.presence.set(user, status, now.ms) {
                    self.push_presence(io, entry);
                }
                ServerFrame::Done(chime_protocol::Empty {})
            }
        };
        io.send(key, answer.reply(rid), Class::Own);
    }

    /// A presence change, to the connections watching that user.
    fn push_presence(&mut self, io: &mut dyn Io, entry: PresenceEntry) {
        let push = ServerFrame::PresenceChanged(entry).reply(0);
        for &k in self.presence.watchers(entry.user_id) {
            io.send(k, push.clone(), Class::Ephemeral);
        }
    }

    /// Hands a request's job to the workers. A job for the shared queue waits (parked, with the
    /// connection's later frames behind it) while the connection has its window of shared jobs.
    /// `subscribes`: the job will subscribe connections with a view read earlier (a login, a
    /// room creation), so the hub remembers what it may miss until it is done.
    fn submit(&mut self, io: &mut dyn Io, key: Key, rid: u32, work: Work, subscribes: bool) {
        let Some(link) = self.link(key) else { return };
        if work.is_shared() && link.shared_inflight >= SHARED_WINDOW {
            link.parked = Some(work);
            if subscribes {
                // Parked: its stamp is taken when it really goes (see `release`).
                link.pending.push((rid, 0));
            }
            return;
        }
        self.dispatch(io, key, rid, work, subscribes);
    }

    fn dispatch(&mut self, io: &mut dyn Io, key: Key, rid: u32, work: Work, subscribes: bool) {
        let shared = work.is_shared();
        if io.db_down() {
            // Refused at once rather than queued behind a dead connection; the client retries.
            return self.refused(io, key, rid, ErrorCode::UNAVAILABLE, "the database is unavailable; retry shortly");
        }
        let stamp = if subscribes { Some(self.hub.begin()) } else { None };
        let chunk = matches!(&work, Work::File(f) if f.chunk);
        if !io.submit(work) {
            if let Some(stamp) = stamp {
                self.hub.end(stamp);
            }
            return self.refused(io, key, rid, ErrorCode::OVERLOADED, "server busy; retry shortly");
        }
        let Some(link) = self.link(key) else { return };
        link.inflight += 1;
        if chunk {
            link.transfers.chunks += 1;
        }
        if shared {
            link.shared_inflight += 1;
        }
        if let Some(stamp) = stamp {
            link.pending.retain(|&(r, _)| r != rid);
            link.pending.push((rid, stamp));
        }
    }

    /// A job could not go: the request fails, and a login returns the connection to logged out.
    fn refused(&mut self, io: &mut dyn Io, key: Key, rid: u32, code: ErrorCode, message: &str) {
        if let Some(link) = self.link(key) {
            link.pending.retain(|&(r, _)| r != rid);
            if matches!(link.phase, Phase::Authenticating) {
                link.phase = Phase::Open;
                io.wake(key);
            }
        }
        error(io, key, rid, code, message);
    }

    /// The client half-closed its socket: the requests it sent are answered, then the
    /// connection closes.
    pub fn read_closed(&mut self, io: &mut dyn Io, key: Key) {
        if let Some(link) = self.link(key) {
            link.half_closed = true;
        }
        self.finish_if_done(io, key);
    }

    fn finish_if_done(&mut self, io: &mut dyn Io, key: Key) {
        if let Some(link) = self.link(key) {
            if link.half_closed && link.inflight == 0 && link.parked.is_none() && !link.ending {
                link.ending = true;
                io.finish(key);
            }
        }
    }

    /// A batch of worker results.
    pub fn completion(&mut self, io: &mut dyn Io, done: Completion, now: Now) {
        for effect in done.0 {
            self.effect(io, effect, now);
        }
    }

    fn effect(&mut self, io: &mut dyn Io, effect: Effect, now: Now) {
        match effect {
            Effect::Reply { to, frame } => {
                if self.link_of(to.conn).is_some() {
                    io.send(to.conn.key, frame, Class::Own);
                }
            }
            Effect::Watched { to, users, seen } => {
                if self.link_of(to.conn).is_some() {
                    self.presence.watch(to.conn.key, &users);
                    let entries = users
                        .iter()
                        .take(presence::MAX_WATCHED)
                        .map(|&u| {
                            let mut entry = self.presence.of(u, now.ms);
                            if entry.status == chime_protocol::PresenceStatus::OFFLINE {
                                let stored = seen.iter().find(|(id, _)| *id == u).map_or(0, |(_, ms)| *ms);
                                entry.last_seen_ms = entry.last_seen_ms.max(stored);
                            }
                            entry
                        })
                        .collect();
                    io.send(
                        to.conn.key,
                        ServerFrame::PresenceList(PresenceList { entries }).reply(to.request_id),
                        Class::Own,
                    );
                }
            }
            Effect::Publish(p) => self.publish(io, &p),
            Effect::Subscribe { user, room, after } => {
                self.hub.changed(user, room, Change::Joined(after));
                for key in self.hub.connections_of_user(user) {
                    match after {
                        Some(after) => self.subscribe_from(io, key, room, after),
                        None => {
                            self.subscribe(key, room);
                        }
                    }
                }
            }
            Effect::Unsubscribe { user, room } => {
                self.hub.changed(user, room, Change::Left);
                for key in self.hub.connections_of_user(user) {
                    self.unsubscribe(io, key, room);
                }
            }
            Effect::PushToUser { user, except, frame } => {
                for key in self.hub.connections_of_user(user) {
                    let left_out = self.links.get(key).and_then(Option::as_ref).is_some_and(|l| Some(l.id) == except);
                    if !left_out {
                        io.send(key, frame.clone(), Class::Own);
                    }
                }
            }
            Effect::LoggedIn { to, user, name, session, rooms, servers } => {
                self.logged_in(io, to, user, name, session, (rooms, servers))
            }
            Effect::JoinedServer { user, server, channels } => {
                for key in self.hub.connections_of_user(user) {
                    self.hub.follow_server(server, key);
                }
                for (room, head) in channels {
                    self.hub.changed(user, room, Change::Joined(Some(head)));
                    for key in self.hub.connections_of_user(user) {
                        self.subscribe_from(io, key, room, head);
                    }
                }
            }
            Effect::LeftServer { user, server, channels } => {
                for key in self.hub.connections_of_user(user) {
                    self.hub.unfollow_server(server, key);
                }
                for room in channels {
                    self.hub.changed(user, room, Change::Left);
                    for key in self.hub.connections_of_user(user) {
                        self.unsubscribe(io, key, room);
                    }
                }
            }
            Effect::RestrictedChannelCreated { server, room, creator } => {
                let mut users: Vec<UserId> = self
                    .hub
                    .followers(server)
                    .into_iter()
                    .filter_map(|key| self.link(key).and_then(|l| l.who()).map(|w| w.actor.user_id))
                    .filter(|&u| u != creator)
                    .collect();
                users.sort_unstable();
                users.dedup();
                if !users.is_empty() && !io.submit(crate::handlers::servers::readers(room, users)) {
                    log::debug!("could not queue the readers check of channel {room}");
                }
            }
            Effect::ChannelCreated { server, room } => {
                self.hub.channel_created(server, room);
                for key in self.hub.followers(server) {
                    self.subscribe_from(io, key, room, Seq::ZERO);
                }
            }
            Effect::LoggedOut { to } => {
                if self.link_of(to.conn).is_some() {
                    self.log_out(to.conn.key, now.secs);
                    self.flush_presence(io);
                }
            }
            Effect::EndSessions { sessions, code } => {
                let message = match code {
                    ErrorCode::SESSION_EXPIRED => "this session reached its lifetime; log in again",
                    _ => "this session was revoked; log in again",
                };
                for session in sessions {
                    for key in self.hub.connections_of_session(session) {
                        self.end_session(io, key, code, message, now.secs);
                    }
                }
            }
            Effect::Page { to, room, fetch, deltas, more } => {
                let Some(sync) = self.link_of(to.conn).and_then(|l| l.sync.as_mut()) else { return };
                let actions = sync.page(room, fetch, deltas, more);
                self.apply(io, to.conn.key, actions);
            }
            Effect::PageFailed { to, room, fetch, why, error } => {
                let Some(sync) = self.link_of(to.conn).and_then(|l| l.sync.as_mut()) else { return };
                let actions = match why {
                    PageFailure::NotMember => sync.skip_room(room, fetch),
                    PageFailure::CursorAhead => sync.reject_room(room, fetch, error),
                    PageFailure::Store => sync.page_failed(room, fetch, error),
                };
                self.apply(io, to.conn.key, actions);
            }
            Effect::Release { to, shared } => self.release(io, to, shared),
            Effect::Then { to, work } => {
                if self.link_of(to.conn).is_some() {
                    self.dispatch(io, to.conn.key, to.request_id, work, false);
                }
            }
            Effect::UploadOpened { to, upload } => self.upload_opened(to, upload),
            Effect::DownloadOpened { to, sha256, offset, end } => self.download_opened(io, to, sha256, offset, end),
            Effect::FileChunks { to, frames, next } => self.file_chunks(io, to, frames, next),
            Effect::DownloadEnded { to } => self.download_ended(to),
            Effect::FileReleased { to, chunk } => {
                if chunk {
                    self.chunk_done(to);
                }
                self.release(io, to, false);
            }
        }
    }

    fn logged_in(
        &mut self,
        io: &mut dyn Io,
        to: ReplyTo,
        user: UserId,
        name: String,
        session: chime_storage::SessionRecord,
        (rooms, servers): (Vec<(RoomId, Seq)>, Vec<chime_storage::ServerId>),
    ) {
        let key = to.conn.key;
        let Some(link) = self.link_of(to.conn) else { return };
        let stamp = link.pending.iter().find(|(r, _)| *r == to.request_id).map_or(0, |&(_, s)| s);
        let who = Who { actor: Actor { user_id: user, name: name.into() }, session: session.id };
        link.phase = Phase::Authed(Box::new(Authed { who, session_created_ms: session.created_at_ms }));
        self.hub.log_in(user, session.id, key);
        // The wall clock only dates "last seen"; nothing here depends on it.
        let first = self.hub.connections_of_user(user).len() == 1;
        if let Some(entry) = self.presence.connected(user, first, chime_storage::now_ms()) {
            self.push_presence(io, entry);
        }
        // The store lists rooms by id, so each subscription appends to the connection's sorted
        // room list: linear in the rooms, whatever their number.
        for (room, head) in rooms {
            self.subscribe_from(io, key, room, head);
        }
        for &server in &servers {
            self.hub.follow_server(server, key);
        }
        // Channels created in the user's servers while the login was read.
        for room in self.hub.channels_since(stamp, &servers) {
            self.subscribe_from(io, key, room, Seq::ZERO);
        }
        // Joins and leaves of the user that the loop carried out while the login was read: the
        // room list may predate them.
        for (room, change) in self.hub.since(stamp, user) {
            match change {
                Change::Joined(Some(after)) => self.subscribe_from(io, key, room, after),
                Change::Joined(None) => {
                    self.subscribe(key, room);
                }
                Change::Left => self.unsubscribe(io, key, room),
            }
        }
        // The unread counts follow the AUTHED (sent with this completion) as a push of their own:
        // counting a user's thousands of rooms must not hold their login up.
        if !io.submit(crate::handlers::receipts::unread_at_login(to.conn, user)) {
            log::debug!("could not queue the unread counts of user {user} at login");
        }
    }

    /// A job of the connection finished: its slot is free. Work that waited for it goes now.
    fn release(&mut self, io: &mut dyn Io, to: ReplyTo, shared: bool) {
        let key = to.conn.key;
        let Some(link) = self.link_of(to.conn) else { return };
        link.inflight = link.inflight.saturating_sub(1);
        if let Some(i) = link.pending.iter().position(|(r, _)| *r == to.request_id) {
            let (_, stamp) = link.pending.swap_remove(i);
            self.hub.end(stamp);
        }
        let Some(link) = self.link_of(to.conn) else { return };
        if matches!(link.phase, Phase::Authenticating) {
            // The login failed: its ERROR is on its way.
            link.phase = Phase::Open;
        }
        if shared {
            link.shared_inflight = link.shared_inflight.saturating_sub(1);
            if let Some(work) = link.parked.take() {
                let rid = work.reply_to().map_or(0, |t| t.request_id);
                let subscribes = link.pending.iter().any(|(r, _)| *r == rid);
                self.dispatch(io, key, rid, work, subscribes);
            } else {
                self.retry_deferred(io, key);
            }
        }
        io.wake(key);
        self.finish_if_done(io, key);
    }

    /// Carries out what the sync state machine asked for.
    fn apply(&mut self, io: &mut dyn Io, key: Key, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send(bytes) => io.send(key, bytes, Class::Own),
                Action::Push(bytes) => io.send(key, bytes, Class::Shared),
                Action::FetchLater { room, after, limit, fetch } => {
                    self.defer(key, Action::Fetch { room, after, limit, fetch })
                }
                Action::Fetch { room, after, limit, fetch } => {
                    if self.can_fetch(io, key) {
                        self.fetch(io, key, room, after, limit, fetch);
                    } else {
                        self.defer(key, Action::Fetch { room, after, limit, fetch });
                    }
                }
            }
        }
    }

    /// Whether a SYNC fetch of the connection may go to the workers now: the client has read most
    /// of what was sent (flow control), the connection has a free slot of its window on the shared
    /// queue, and the database is there.
    fn can_fetch(&self, io: &dyn Io, key: Key) -> bool {
        let Some(link) = self.links.get(key).and_then(Option::as_ref) else { return false };
        io.queued(key) <= self.config.max_outbound_bytes / 2 && link.shared_inflight < SHARED_WINDOW && !io.db_down()
    }

    fn fetch(&mut self, io: &mut dyn Io, key: Key, room: RoomId, after: Seq, limit: u32, fetch: FetchId) {
        let Some(link) = self.link(key) else { return };
        let Some(who) = link.who() else { return };
        let to = ReplyTo { conn: link.id, request_id: 0 };
        let job = handlers::sync::FetchJob::sync(to, who.actor.clone(), room, after, limit, fetch);
        if !io.submit(Work::Shared(Box::new(job))) {
            // The shared queue is full: the client must come back for it.
            let message = "server overloaded during sync; reconnect and SYNC";
            return self.end(io, key, ErrorCode::RESYNC_REQUIRED, message, Bye::Replace { resync: true });
        }
        if let Some(link) = self.link(key) {
            link.inflight += 1;
            link.shared_inflight += 1;
        }
    }

    /// Keeps a SYNC fetch for later, behind the ones already waiting.
    fn defer(&mut self, key: Key, fetch: Action) {
        if let Some(sync) = self.link(key).and_then(|l| l.sync.as_mut()) {
            sync.deferred.push_back(fetch);
        }
    }

    /// Submits the deferred SYNC fetches of a connection, oldest first, while it may; stops at the
    /// first that must still wait, so each call costs what it submits, not what waits.
    pub fn retry_deferred(&mut self, io: &mut dyn Io, key: Key) {
        while self.can_fetch(io, key) {
            let Some(sync) = self.link(key).and_then(|l| l.sync.as_mut()) else { return };
            let Some(next) = sync.deferred.pop_front() else { return };
            // A fetch a newer one replaced need not run.
            if let Action::Fetch { room, after, limit, fetch } = next {
                if sync.wants(room, fetch) {
                    self.fetch(io, key, room, after, limit, fetch);
                }
            }
        }
    }

    /// Subscribes a connection to a room's pushes. Returns whether it was not subscribed yet.
    fn subscribe(&mut self, key: Key, room: RoomId) -> bool {
        let Some(link) = self.link(key) else { return false };
        let Err(at) = link.rooms.binary_search(&room) else { return false };
        link.rooms.insert(at, room);
        self.hub.subscribe(room, key);
        true
    }

    /// Subscribes a connection that knows the room's log up to `after`. Deltas the loop published
    /// before this subscription and after `after` were not sent to it: it catches up on them
    /// (a page fetch, with live pushes held meanwhile) so that it sees no gap.
    fn subscribe_from(&mut self, io: &mut dyn Io, key: Key, room: RoomId, after: Seq) {
        if !self.subscribe(key, room) {
            // Already subscribed: it has received every push since.
            return;
        }
        if self.hub.head(room).is_some_and(|head| head > after) {
            let Some(link) = self.link(key) else { return };
            let actions = link.sync.get_or_insert_with(Default::default).catch_up(room, after);
            self.apply(io, key, actions);
        }
    }

    fn unsubscribe(&mut self, io: &mut dyn Io, key: Key, room: RoomId) {
        let mut actions = Vec::new();
        if let Some(link) = self.link(key) {
            if let Ok(at) = link.rooms.binary_search(&room) {
                link.rooms.remove(at);
            }
            if let Some(sync) = link.sync.as_mut() {
                // A SYNC still open may now be complete.
                actions = sync.forget(room);
            }
        }
        self.hub.unsubscribe(room, key);
        self.apply(io, key, actions);
    }

    /// Fan-out of one committed batch of a room's deltas to every online member.
    fn publish(&mut self, io: &mut dyn Io, p: &Published) {
        self.hub.published(p.room, p.last_seq());
        let mut fetches = Vec::new();
        for &key in self.hub.subscribers(p.room) {
            let Some(link) = self.links.get_mut(key).and_then(Option::as_mut) else { continue };
            match link.sync.as_mut() {
                None => io.send(key, p.frames.clone(), Class::Shared),
                Some(sync) => {
                    for a in sync.push(p) {
                        match a {
                            Action::Send(b) => io.send(key, b, Class::Own),
                            Action::Push(b) => io.send(key, b, Class::Shared),
                            // Rare (a gap in live pushes); applied after the fan-out.
                            fetch @ (Action::Fetch { .. } | Action::FetchLater { .. }) => fetches.push((key, fetch)),
                        }
                    }
                }
            }
        }
        for (key, fetch) in fetches {
            self.apply(io, key, vec![fetch]);
        }
    }

    /// A connection logs out (LOGOUT, or it closes): it leaves its rooms and its session's list,
    /// and its session's last use is now.
    fn log_out(&mut self, key: Key, now_secs: u32) {
        let Some(link) = self.link(key) else { return };
        let rooms = std::mem::take(&mut link.rooms);
        let who = link.who().cloned();
        link.phase = Phase::Open;
        link.unauth_since = now_secs;
        if let Some(sync) = link.sync.as_mut() {
            sync.restart();
        }
        for room in rooms {
            self.hub.unsubscribe(room, key);
        }
        if let Some(who) = who {
            let user = who.actor.user_id;
            self.hub.log_out(user, who.session, key);
            self.touched.push(who.session);
            let last = self.hub.connections_of_user(user).is_empty();
            if let Some(entry) = self.presence.disconnected(user, key, last, chime_storage::now_ms()) {
                self.went_offline.push(entry);
            }
        }
    }

    /// Pushes the offline transitions waiting for an `Io`.
    fn flush_presence(&mut self, io: &mut dyn Io) {
        for entry in std::mem::take(&mut self.went_offline) {
            self.push_presence(io, entry);
        }
    }

    /// Ends a logged-in connection whose session ended: logged out, then GOODBYE after the replies
    /// already queued (the revoking request's own answer goes first).
    fn end_session(&mut self, io: &mut dyn Io, key: Key, code: ErrorCode, message: &str, now_secs: u32) {
        self.log_out(key, now_secs);
        self.flush_presence(io);
        self.end(io, key, code, message, Bye::AfterQueue);
    }

    /// The connection is gone (its socket closed, or the loop closed it).
    pub fn closed(&mut self, key: Key) {
        self.log_out(key, 0);
        if let Some(link) = self.links.get_mut(key).and_then(Option::take) {
            for (_, stamp) in link.pending {
                self.hub.end(stamp);
            }
        }
    }

    /// Once a second: heartbeats; handshake, login and idle timeouts; session lifetimes; retries
    /// of deferred SYNC fetches; the record of sessions' last use; pruning the hub.
    pub fn tick(&mut self, io: &mut dyn Io, now: Now) {
        self.flush_presence(io);
        let hb = self.config.heartbeat_secs.max(1);
        let auth_timeout = self.config.auth_timeout_secs;
        let max_age_ms = self.session_limits.max_age_ms;
        let mut to_close = Vec::new();
        let mut ends = Vec::new();
        let mut pings = Vec::new();
        let mut retries = Vec::new();
        for (key, link) in self.links.iter().enumerate() {
            let Some(link) = link else { continue };
            if link.ending {
                continue;
            }
            let quiet = now.secs.saturating_sub(link.last_heard);
            match &link.phase {
                Phase::Handshake if quiet >= HANDSHAKE_SECS => to_close.push(key),
                Phase::Open | Phase::Authenticating if now.secs.saturating_sub(link.unauth_since) >= auth_timeout => {
                    ends.push((key, ErrorCode::AUTH_TIMEOUT, "not logged in within the server's deadline"))
                }
                Phase::Authed(a) if now.ms.saturating_sub(a.session_created_ms) > max_age_ms => {
                    ends.push((key, ErrorCode::SESSION_EXPIRED, "this session reached its lifetime; log in again"))
                }
                _ if quiet >= 3 * hb => {
                    ends.push((key, ErrorCode::IDLE_TIMEOUT, "nothing heard within the idle timeout"))
                }
                Phase::Handshake => {}
                _ if quiet >= hb && !link.ping_sent => pings.push(key),
                _ => {}
            }
            if link.sync.as_ref().is_some_and(|s| !s.deferred.is_empty()) {
                retries.push(key);
            }
        }
        for key in to_close {
            io.close(key);
        }
        for (key, code, message) in ends {
            if code == ErrorCode::SESSION_EXPIRED {
                self.end_session(io, key, code, message, now.secs);
            } else {
                self.end(io, key, code, message, Bye::Replace { resync: false });
            }
        }
        for key in pings {
            if let Some(link) = self.link(key) {
                link.ping_sent = true;
            }
            io.send(key, ServerFrame::Ping(Ping { nonce: u64::from(now.secs) }).reply(0), Class::Own);
        }
        for key in retries {
            self.retry_deferred(io, key);
        }
        self.pump_all(io);
        if now.secs.is_multiple_of(TOUCH_LIVE_EVERY) {
            self.touched.extend(self.hub.live_sessions());
        }
        self.hub.prune();
    }

    /// Records the last use of the sessions whose connections closed since the last call, in one
    /// job nobody waits for (one job for a mass disconnect).
    pub fn touch_sessions(&mut self, io: &mut dyn Io) {
        if self.touched.is_empty() || io.db_down() {
            // Kept for later while the database is away: these are only timestamps.
            return;
        }
        let mut sessions = std::mem::take(&mut self.touched);
        sessions.sort_unstable();
        sessions.dedup();
        if !io.submit(accounts::touch(sessions)) {
            log::debug!("could not queue the last use of closed sessions");
        }
    }

    /// Every session still connected is in use now (at shutdown).
    pub fn touch_all(&mut self) {
        self.touched.extend(self.hub.live_sessions());
    }
}

enum LoginKind {
    Password(bool, chime_protocol::Credentials),
    Resume(chime_protocol::Resume),
}

/// The sessions of `user` that have a live connection.
fn online_sessions(hub: &Hub, links: &[Option<Link>], user: UserId) -> Vec<SessionId> {
    let mut live: Vec<SessionId> = hub
        .connections_of_user(user)
        .into_iter()
        .filter_map(|k| links.get(k).and_then(Option::as_ref).and_then(Link::who).map(|w| w.session))
        .collect();
    live.sort_unstable();
    live.dedup();
    live
}

fn error(io: &mut dyn Io, key: Key, rid: u32, code: ErrorCode, message: &str) {
    io.send(key, ServerFrame::Error(ErrorBody::new(code, message)).reply(rid), Class::Own);
}

/// When sessions expire, from the configuration.
pub fn session_limits(config: &Config) -> SessionLimits {
    let ms = |secs: u64| i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    SessionLimits { idle_ms: ms(config.session_idle_secs), max_age_ms: ms(config.session_max_age_secs) }
}

#[cfg(test)]
mod tests;
