//! A blocking request/reply client over `std::net` and rustls: [`Client`].
//!
//! Each call writes what the [`Session`] queued and reads until the answer it waits for arrives,
//! with a timeout; everything else that arrives meanwhile (pushes, replies to requests sent with
//! [`Client::send`]) is kept, in order, for [`Client::recv`] or [`Client::next_event`]. The
//! session does the protocol: request ids, reply matching, answering server pings, heartbeats
//! (checked whenever the client waits), SYNC page checks and, for rooms given to
//! [`Client::follow`], gap detection and resync. `chime`, the setup phase of `chime-load` and the
//! integration tests all talk to `chimed` through this type.
//!
//! TLS is trust-on-first-use ([`crate::tls`]): the SHA-256 of the server's leaf certificate is
//! exposed with [`Client::server_fingerprint`] for the caller to pin, and a pinned fingerprint
//! that does not match fails the handshake with [`ClientError::FingerprintMismatch`].
//!
//! Only `std` is used (no unix-specific APIs), so the client builds for Windows unchanged.

pub use crate::error::ClientError;
pub use crate::idempotency::new_idempotency_key;
use crate::session::{Event, Session, SessionConfig, Tick, HELLO_ID};
use crate::tls::{server_name, tofu_client_config};
use chime_protocol::fingerprint::fingerprint_hex;
use chime_protocol::{
    Authed, ClientFrame, CreateChannel, CreateRoom, CreateServer, Credentials, DefineRole, DefineServerRole,
    DeleteMessage, Delta, DeltaPage, Edit, Empty, ErrorCode, GetProfile, GetSettings, History, Identity, Limits,
    ListMembers, ListRooms, ListServers, ListSessions, MemberInfo, MessagePage, ModAction, Moderate, NotificationList,
    Notifications, OpenDirect, Permissions, Pin, Ping, Post, Posted, PresenceList, PresenceStatus, Profile, React,
    ReadState, Receipt, Reply, Restore, RestoreOrder, RestorePage, Resume, RevokeSessions, RoomCursor, RoomDetails,
    RoomId, RoomInfo, RoomKind, RoomRef, Search, Seq, ServerFrame, ServerId, ServerInfo, ServerList, ServerRef,
    SessionInfo, SetPresence, SetServerRole, SetSetting, SettingChanged, Settings, Sync, SyncDone, Unread, UnreadList,
    UpdateProfile, UserId, View, WatchPresence, Welcome, DEFAULT_MAX_FRAME, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use chime_protocol::{
    Download, DownloadAck, DownloadMeta, FileStored, Forward, UploadBegin, UploadChunk, UploadFinish, UploadResume,
    UploadState,
};
use rustls::ClientConnection;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Page size [`Client::members`], [`Client::list_rooms`] and [`Client::list_sessions`] ask for.
const PAGE: u32 = 500;

/// Times [`Client::settings`] reads the pages again when the settings changed between two of them.
const SETTINGS_READS: usize = 5;
/// How long [`Client::restore_all`] waits after a `RATE_LIMITED` that does not say how long.
const RATE_LIMIT_WAIT: Duration = Duration::from_millis(100);
/// The longest wait [`Client::restore_all`] takes from a `RATE_LIMITED`, whatever it says.
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// `RATE_LIMITED` answers in a row to one page after which [`Client::restore_all`] gives up: a
/// server that states a wait admits the page once it is over.
const MAX_RATE_LIMITED: u32 = 50;

/// What [`Client::restore_all`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The room's head when the restore began (for a newest-first restore, where it started).
    pub head: Seq,
    /// Deltas handed over.
    pub deltas: u64,
    /// Pages read.
    pub pages: u64,
    /// `RATE_LIMITED` refusals waited out.
    pub waits: u64,
}

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

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

/// A connected, handshaken Chime connection.
///
/// Not thread-safe by design: one thread drives it, as with a `TcpStream`.
#[derive(Debug)]
pub struct Client {
    /// The byte stream, plain or TLS.
    transport: Transport,
    /// The protocol state.
    session: Session,
    /// Events that arrived while waiting for something else (pushes, replies to `send`), oldest
    /// first; all older than anything still in the session.
    queue: VecDeque<Event>,
    /// Per-request reply timeout.
    timeout: Duration,
    /// The server's answer to our `HELLO`.
    welcome: Welcome,
    /// SHA-256 of the server's leaf certificate (TLS only).
    fingerprint: Option<[u8; 32]>,
    /// Nonce for the next [`Client::ping`].
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
        let mut config = SessionConfig::new(opts.client_name.clone(), opts.client_version.clone());
        config.max_frame = opts.max_frame;
        let mut client = Client {
            transport,
            session: Session::new(config, Instant::now()),
            queue: VecDeque::new(),
            timeout: opts.timeout,
            welcome: Welcome {
                protocol_version: PROTOCOL_VERSION,
                min_version: MIN_PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                server_name: String::new(),
                server_version: String::new(),
                limits: Limits { heartbeat_secs: 0, ..Limits::default() },
            },
            fingerprint,
            next_nonce: 1,
        };
        client.flush()?;
        loop {
            // A refusal is an ERROR then GOODBYE/close; the ERROR says more than the close does,
            // whatever request id the server gave it.
            let event = match client.next_session_event(Some(deadline)) {
                Ok(Some(event)) => event,
                Ok(None) => return Err(ClientError::Timeout),
                Err(ClientError::Closed(g)) => {
                    return Err(client.take_queued_error().unwrap_or(ClientError::Closed(g)))
                }
                Err(e) => return Err(e),
            };
            match event {
                Event::Connected(welcome) => {
                    client.welcome = welcome;
                    return Ok(client);
                }
                Event::Failed { request_id: HELLO_ID, error } => return Err(ClientError::Server(error)),
                Event::Invalid { request_id: HELLO_ID, error } => return Err(error.into()),
                Event::Goodbye(g) => {
                    return Err(client.take_queued_error().unwrap_or(ClientError::Closed(Some(g))));
                }
                other => client.queue.push_back(other),
            }
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

    /// How long a request waits for its reply (the connect options' timeout): what a caller
    /// waiting for a reply through [`Client::next_event`] should allow too.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The protocol state: followed rooms' cursors, pending requests, why it closed.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Sends a frame under the next request id and returns that id. The reply is read by
    /// [`Client::recv`]. Frames longer than the server's `max_frame` are refused locally, since
    /// the server would drop the connection for them.
    pub fn send(&mut self, frame: &ClientFrame) -> Result<u32, ClientError> {
        let id = self.session.send(frame)?;
        self.flush()?;
        Ok(id)
    }

    /// Returns the next frame from the server, reply or push, oldest first. `timeout: None`
    /// waits indefinitely; `Ok(None)` means the timeout passed with nothing to return.
    ///
    /// A server `PING` is answered and not returned; a `GOODBYE` is returned as
    /// `Err(Closed(Some(..)))` and EOF as `Err(Closed(None))`. A frame that cannot be decoded is
    /// returned as `Err(Decode(..))`; unless the error is fatal, later frames can still be read.
    /// For followed rooms (see [`Client::follow`]) pushes are the ones the session passes on
    /// (no duplicates, none past a gap), and deltas it fetched itself are not returned here (see
    /// [`Client::next_event`]).
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<(u32, ServerFrame)>, ClientError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let event = match self.queue.pop_front() {
                Some(event) => event,
                None => match self.next_session_event(deadline)? {
                    Some(event) => event,
                    None => return Ok(None),
                },
            };
            match event {
                Event::Reply { request_id, frame } => return Ok(Some((request_id, frame))),
                Event::Failed { request_id, error } => return Ok(Some((request_id, ServerFrame::Error(error)))),
                Event::Delta { delta, sync: None } => return Ok(Some((0, ServerFrame::Delta(delta)))),
                Event::Push(frame) => return Ok(Some((0, frame))),
                Event::Goodbye(g) => return Err(ClientError::Closed(Some(g))),
                Event::Invalid { error, .. } => return Err(error.into()),
                Event::Delta { sync: Some(_), .. } | Event::Gap { .. } | Event::Connected(_) => {}
            }
        }
    }

    /// Returns the next [`Event`], oldest first, reading as needed; `Ok(None)` once `timeout`
    /// passes (`None` waits indefinitely). Unlike [`Client::recv`] this gives everything the
    /// session reports, including the deltas of followed rooms however they arrived and the gaps
    /// it filled. After a [`Event::Goodbye`] the next call reports the close.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, ClientError> {
        if let Some(event) = self.queue.pop_front() {
            return Ok(Some(event));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        self.next_session_event(deadline)
    }

    /// Follows `room` from `cursor` (see [`Session::follow`]): its deltas then come as
    /// [`Event::Delta`]s from [`Client::next_event`], once each and in order, and the session
    /// SYNCs gaps by itself.
    ///
    /// Pushes of the room already read but not yet taken (they arrive as soon as the login is
    /// done, before the caller could follow) are judged again against `cursor`, so none of them
    /// jumps ahead of the catch-up.
    pub fn follow(&mut self, room: impl Into<RoomId>, cursor: impl Into<Seq>) {
        let room = room.into();
        // Events the session holds came after those queued here: queue them behind, so that
        // every early push of the room is judged below in the order it arrived.
        while let Some(event) = self.session.poll_event() {
            self.queue.push_back(event);
        }
        self.session.follow(room, cursor.into());
        let queued = std::mem::take(&mut self.queue);
        for event in queued {
            match event {
                Event::Delta { delta, sync: None } if delta.room == room => self.session.replay_push(delta),
                other => self.queue.push_back(other),
            }
        }
        while let Some(event) = self.session.poll_event() {
            self.queue.push_back(event);
        }
    }

    /// SYNCs every followed room not being synced yet, from its cursor (see
    /// [`Session::sync_followed`]); returns the SYNC's request id, `None` if there was nothing to
    /// sync. Its outcome comes through [`Client::next_event`].
    pub fn sync_followed(&mut self) -> Result<Option<u32>, ClientError> {
        let id = self.session.sync_followed()?;
        self.flush()?;
        Ok(id)
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

    /// `CREATE_ROOM` for a group room anyone may join; the creator becomes its owner.
    pub fn create_room(&mut self, name: &str) -> Result<RoomInfo, ClientError> {
        self.create_room_of(name, RoomKind::GROUP)
    }

    /// `CREATE_ROOM` of a given kind (`GROUP`, or `PRIVATE` for an invite-only group).
    pub fn create_room_of(&mut self, name: &str, kind: RoomKind) -> Result<RoomInfo, ClientError> {
        let body = CreateRoom { name: name.to_string(), kind };
        match self.request(&ClientFrame::CreateRoom(body))? {
            ServerFrame::RoomInfo(r) => Ok(r),
            other => Err(unexpected("ROOM_INFO", &other)),
        }
    }

    /// `MODERATE`: one moderation step on `user` (`role` only for `SET_ROLE`).
    pub fn moderate(
        &mut self,
        room: impl Into<RoomId>,
        user: &str,
        action: ModAction,
        role: &str,
    ) -> Result<Posted, ClientError> {
        let body = Moderate { room: room.into(), user: user.to_string(), action, role: role.to_string() };
        self.posted(ClientFrame::Moderate(body))
    }

    /// `DEFINE_ROLE`: defines (or with `None`, removes) a role of the room.
    pub fn define_role(
        &mut self,
        room: impl Into<RoomId>,
        name: &str,
        permissions: Option<Permissions>,
    ) -> Result<Posted, ClientError> {
        self.posted(ClientFrame::DefineRole(DefineRole { room: room.into(), name: name.to_string(), permissions }))
    }

    /// `CREATE_SERVER`: a community owned by the caller, with a `general` channel.
    pub fn create_server(&mut self, name: &str, description: &str, public: bool) -> Result<ServerInfo, ClientError> {
        let body = CreateServer { name: name.to_string(), description: description.to_string(), public };
        self.server_info(ClientFrame::CreateServer(body))
    }

    /// `JOIN_SERVER`: joins a public server; the answer lists the channels now readable.
    pub fn join_server(&mut self, server: impl Into<ServerId>) -> Result<ServerInfo, ClientError> {
        self.server_info(ClientFrame::JoinServer(ServerRef { server: server.into() }))
    }

    /// `LEAVE_SERVER`.
    pub fn leave_server(&mut self, server: impl Into<ServerId>) -> Result<(), ClientError> {
        self.done(ClientFrame::LeaveServer(ServerRef { server: server.into() }))
    }

    /// `LIST_SERVERS`: one page of the user's servers.
    pub fn list_servers(&mut self, after: impl Into<ServerId>, limit: u32) -> Result<ServerList, ClientError> {
        match self.request(&ClientFrame::ListServers(ListServers { after_server: after.into(), limit }))? {
            ServerFrame::ServerList(l) => Ok(l),
            other => Err(unexpected("SERVER_LIST", &other)),
        }
    }

    /// `CREATE_CHANNEL`: a channel of a server, readable and writable by the roles given (all
    /// members when empty).
    pub fn create_channel(&mut self, channel: CreateChannel) -> Result<RoomInfo, ClientError> {
        match self.request(&ClientFrame::CreateChannel(channel))? {
            ServerFrame::RoomInfo(r) => Ok(r),
            other => Err(unexpected("ROOM_INFO", &other)),
        }
    }

    /// `SET_SERVER_ROLE`.
    pub fn set_server_role(&mut self, server: impl Into<ServerId>, user: &str, role: &str) -> Result<(), ClientError> {
        let body = SetServerRole { server: server.into(), user: user.to_string(), role: role.to_string() };
        self.done(ClientFrame::SetServerRole(body))
    }

    /// `MODERATE_SERVER`: invite a user to a server, ban or unban them.
    pub fn moderate_server(
        &mut self,
        server: impl Into<ServerId>,
        user: &str,
        action: chime_protocol::ModAction,
    ) -> Result<(), ClientError> {
        let body = chime_protocol::ModerateServer { server: server.into(), user: user.to_string(), action };
        self.done(ClientFrame::ModerateServer(body))
    }

    /// `DEFINE_SERVER_ROLE`.
    pub fn define_server_role(
        &mut self,
        server: impl Into<ServerId>,
        name: &str,
        permissions: Option<Permissions>,
    ) -> Result<(), ClientError> {
        let body = DefineServerRole { server: server.into(), name: name.to_string(), permissions };
        self.done(ClientFrame::DefineServerRole(body))
    }

    fn server_info(&mut self, frame: ClientFrame) -> Result<ServerInfo, ClientError> {
        match self.request(&frame)? {
            ServerFrame::ServerInfo(s) => Ok(*s),
            other => Err(unexpected("SERVER_INFO", &other)),
        }
    }

    fn done(&mut self, frame: ClientFrame) -> Result<(), ClientError> {
        match self.request(&frame)? {
            ServerFrame::Done(_) => Ok(()),
            other => Err(unexpected("DONE", &other)),
        }
    }

    /// `RECEIPT`: delivered and read positions in a room; returns its read state.
    pub fn receipt(
        &mut self,
        room: impl Into<RoomId>,
        delivered: impl Into<Seq>,
        read: impl Into<Seq>,
    ) -> Result<ReadState, ClientError> {
        let body = Receipt { room: room.into(), delivered: delivered.into(), read: read.into() };
        match self.request(&ClientFrame::Receipt(body))? {
            ServerFrame::ReadState(s) => Ok(s),
            other => Err(unexpected("READ_STATE", &other)),
        }
    }

    /// `UNREAD`: one page of the rooms with something unread.
    pub fn unread(&mut self, after: impl Into<RoomId>, limit: u32) -> Result<UnreadList, ClientError> {
        match self.request(&ClientFrame::Unread(Unread { after_room: after.into(), limit }))? {
            ServerFrame::UnreadList(l) => Ok(l),
            other => Err(unexpected("UNREAD_LIST", &other)),
        }
    }

    /// `NOTIFICATIONS`: the user's recent mentions, newest first.
    pub fn notifications(&mut self, limit: u32) -> Result<NotificationList, ClientError> {
        match self.request(&ClientFrame::Notifications(Notifications { limit }))? {
            ServerFrame::NotificationList(l) => Ok(l),
            other => Err(unexpected("NOTIFICATION_LIST", &other)),
        }
    }

    /// `CALL`: one call signalling step (`call` is the seq of the call's invite; 0 for INVITE).
    pub fn call(
        &mut self,
        room: impl Into<RoomId>,
        action: chime_protocol::CallAction,
        call: impl Into<Seq>,
        data: &str,
    ) -> Result<Posted, ClientError> {
        let body = chime_protocol::Call { room: room.into(), action, call: call.into(), data: data.to_string() };
        self.posted(ClientFrame::Call(body))
    }

    /// `TYPING`: the user is typing in `room` (the server throttles the notices).
    pub fn typing(&mut self, room: impl Into<RoomId>) -> Result<(), ClientError> {
        self.done(ClientFrame::Typing(chime_protocol::Typing { room: room.into() }))
    }

    /// `SET_PRESENCE`: online or away.
    pub fn set_presence(&mut self, status: PresenceStatus) -> Result<(), ClientError> {
        self.done(ClientFrame::SetPresence(SetPresence { status }))
    }

    /// `WATCH_PRESENCE`: these users' presence now; changes then come as pushes.
    pub fn watch_presence(&mut self, users: Vec<UserId>) -> Result<PresenceList, ClientError> {
        match self.request(&ClientFrame::WatchPresence(WatchPresence { users }))? {
            ServerFrame::PresenceList(l) => Ok(l),
            other => Err(unexpected("PRESENCE_LIST", &other)),
        }
    }

    /// `OPEN_DIRECT`: the direct dialog with `user`, created on first use.
    pub fn open_direct(&mut self, user: &str) -> Result<RoomInfo, ClientError> {
        match self.request(&ClientFrame::OpenDirect(OpenDirect { user: user.to_string() }))? {
            ServerFrame::RoomInfo(r) => Ok(r),
            other => Err(unexpected("ROOM_INFO", &other)),
        }
    }

    /// `JOIN_ROOM`.
    pub fn join_room(&mut self, room: impl Into<RoomId>) -> Result<RoomInfo, ClientError> {
        let room = room.into();
        match self.request(&ClientFrame::JoinRoom(RoomRef { room }))? {
            ServerFrame::RoomInfo(r) => Ok(r),
            other => Err(unexpected("ROOM_INFO", &other)),
        }
    }

    /// `GET_ROOM`: the room, its member count and the user's role in it.
    pub fn get_room(&mut self, room: impl Into<RoomId>) -> Result<RoomDetails, ClientError> {
        let room = room.into();
        match self.request(&ClientFrame::GetRoom(RoomRef { room }))? {
            ServerFrame::RoomDetails(d) => Ok(d),
            other => Err(unexpected("ROOM_DETAILS", &other)),
        }
    }

    /// `WHOAMI`: who this connection is logged in as.
    pub fn whoami(&mut self) -> Result<Identity, ClientError> {
        match self.request(&ClientFrame::Whoami(Empty {}))? {
            ServerFrame::Identity(i) => Ok(i),
            other => Err(unexpected("IDENTITY", &other)),
        }
    }

    /// `LEAVE_ROOM`.
    pub fn leave_room(&mut self, room: impl Into<RoomId>) -> Result<(), ClientError> {
        let room = room.into();
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
    pub fn members(&mut self, room: impl Into<RoomId>) -> Result<Vec<MemberInfo>, ClientError> {
        let room = room.into();
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

    /// `GET_PROFILE`: the user's own profile (`None`), with the email, or another user's by name,
    /// without it.
    pub fn profile(&mut self, user: Option<&str>) -> Result<Profile, ClientError> {
        let body = GetProfile { user: user.map(str::to_string) };
        match self.request(&ClientFrame::GetProfile(body))? {
            ServerFrame::Profile(p) => Ok(p),
            other => Err(unexpected("PROFILE", &other)),
        }
    }

    /// `UPDATE_PROFILE`: `email` `None` leaves it, `Some(None)` removes it, `Some(Some(e))` sets
    /// it; `display_name` `None` leaves it. Returns the profile after the change.
    pub fn update_profile(
        &mut self,
        email: Option<Option<&str>>,
        display_name: Option<&str>,
    ) -> Result<Profile, ClientError> {
        let body = UpdateProfile {
            email: email.map(|e| e.map(str::to_string)),
            display_name: display_name.map(str::to_string),
        };
        match self.request(&ClientFrame::UpdateProfile(body))? {
            ServerFrame::Profile(p) => Ok(p),
            other => Err(unexpected("PROFILE", &other)),
        }
    }

    /// Every setting of the user, from `GET_SETTINGS` pages of 500 rooms, as one `SETTINGS` with
    /// `next_after` none. The pages must share a version: when a change lands between two of them
    /// the read starts over (a few times, then `Protocol`), so the result is one state of the
    /// settings, never a mix.
    pub fn settings(&mut self) -> Result<Settings, ClientError> {
        for _ in 0..SETTINGS_READS {
            let mut all = Settings { version: 0, entries: Vec::new(), next_after: None };
            let mut after = RoomId(0);
            let consistent = loop {
                let page =
                    match self.request(&ClientFrame::GetSettings(GetSettings { after_room: after, limit: PAGE }))? {
                        ServerFrame::Settings(page) => page,
                        other => return Err(unexpected("SETTINGS", &other)),
                    };
                if after == RoomId(0) {
                    all.version = page.version;
                } else if page.version != all.version {
                    break false;
                }
                all.entries.extend(page.entries);
                match page.next_after {
                    None => break true,
                    Some(next) if next <= after => {
                        return Err(ClientError::Protocol(format!(
                            "SETTINGS next_after {next} does not advance past {after}"
                        )))
                    }
                    Some(next) => after = next,
                }
            };
            if consistent {
                return Ok(all);
            }
        }
        Err(ClientError::Protocol(format!("the settings changed during each of {SETTINGS_READS} reads")))
    }

    /// `SET_SETTING`: returns the setting as stored (the value in the server's spelling) and the
    /// settings version it made. The user's other connections get it as a `SETTING_CHANGED` push.
    pub fn set_setting(&mut self, key: &str, value: &str) -> Result<SettingChanged, ClientError> {
        let body = SetSetting { key: key.to_string(), value: value.to_string() };
        match self.request(&ClientFrame::SetSetting(body))? {
            ServerFrame::Setting(s) => Ok(s),
            other => Err(unexpected("SETTING", &other)),
        }
    }

    /// Requests pages until the reply's cursor is `None`. `request` builds the request for a
    /// cursor; `page` splits a reply into its items and next cursor (or gives the frame back when
    /// it is not the expected reply, named `what`).
    fn all_pages<T, K: Copy + Ord + Default + std::fmt::Display>(
        &mut self,
        what: &str,
        request: impl Fn(K) -> ClientFrame,
        page: impl Fn(ServerFrame) -> Result<(Vec<T>, Option<K>), ServerFrame>,
    ) -> Result<Vec<T>, ClientError> {
        let mut all = Vec::new();
        let mut after = K::default();
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
    pub fn post(&mut self, room: impl Into<RoomId>, idempotency_key: &str, text: &str) -> Result<Posted, ClientError> {
        let room = room.into();
        let body = Post { room, idempotency_key: idempotency_key.to_string(), text: text.to_string() };
        match self.request(&ClientFrame::Post(body))? {
            ServerFrame::Posted(p) => Ok(p),
            other => Err(unexpected("POSTED", &other)),
        }
    }

    /// `UPLOAD_BEGIN`: starts an upload of `size` bytes hashing to `sha256`, to share in `room`.
    pub fn upload_begin(
        &mut self,
        room: impl Into<RoomId>,
        name: &str,
        size: u64,
        media_type: &str,
        sha256: [u8; 32],
    ) -> Result<UploadState, ClientError> {
        let body = UploadBegin { room: room.into(), name: name.into(), size, media_type: media_type.into(), sha256 };
        match self.request(&ClientFrame::UploadBegin(body))? {
            ServerFrame::UploadState(s) => Ok(s),
            other => Err(unexpected("UPLOAD_STATE", &other)),
        }
    }

    /// `UPLOAD_RESUME`: where upload `upload` stands; its chunks may then be sent on this
    /// connection.
    pub fn upload_resume(&mut self, upload: u64) -> Result<UploadState, ClientError> {
        match self.request(&ClientFrame::UploadResume(UploadResume { upload }))? {
            ServerFrame::UploadState(s) => Ok(s),
            other => Err(unexpected("UPLOAD_STATE", &other)),
        }
    }

    /// Sends the bytes of an upload from `state.offset` to its end, read from `source` (read from
    /// `state.offset` on: the caller seeks), with up to the server's window of chunks
    /// unacknowledged. `progress` is told each acknowledged offset. Returns the bytes stored.
    /// Only one chunk is ever held.
    pub fn upload_bytes(
        &mut self,
        state: &UploadState,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, ClientError> {
        let chunk = (state.chunk_size.clamp(1, 1 << 20)) as u64;
        let window = state.window.clamp(1, 256) as usize;
        let mut sent = state.offset;
        let mut acked = state.offset;
        let mut outstanding: VecDeque<u32> = VecDeque::new();
        while acked < state.size {
            while outstanding.len() < window && sent < state.size {
                let n = chunk.min(state.size - sent) as usize;
                let mut data = vec![0u8; n];
                source.read_exact(&mut data).map_err(io_error)?;
                let id = self.session.send(&ClientFrame::UploadChunk(UploadChunk {
                    upload: state.upload,
                    offset: sent,
                    data,
                }))?;
                outstanding.push_back(id);
                sent += n as u64;
            }
            self.flush()?;
            let Some(id) = outstanding.pop_front() else { break };
            let deadline = Instant::now() + self.timeout;
            match self.await_reply(id, deadline)? {
                ServerFrame::ChunkStored(c) => {
                    acked = c.offset;
                    progress(acked);
                }
                other => return Err(unexpected("CHUNK_STORED", &other)),
            }
        }
        Ok(acked)
    }

    /// `UPLOAD_FINISH`: the server verifies the size and hash, stores and shares the file.
    pub fn upload_finish(&mut self, upload: u64, caption: &str) -> Result<FileStored, ClientError> {
        match self.request(&ClientFrame::UploadFinish(UploadFinish { upload, caption: caption.into() }))? {
            ServerFrame::FileStored(f) => Ok(f),
            other => Err(unexpected("FILE_STORED", &other)),
        }
    }

    /// `DOWNLOAD`: streams file `file` from `offset` to its end into `sink`, acknowledging as it
    /// goes so the server's window stays open. `progress` is told each offset written. Returns
    /// the file's metadata; the caller checks the hash (it may have the start of the file
    /// already).
    pub fn download(
        &mut self,
        file: u64,
        offset: u64,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(&DownloadMeta, u64),
    ) -> Result<DownloadMeta, ClientError> {
        let id = self.send(&ClientFrame::Download(Download { file, offset, length: 0 }))?;
        let meta = match self.await_reply(id, Instant::now() + self.timeout)? {
            ServerFrame::DownloadMeta(m) => *m,
            other => return Err(unexpected("DOWNLOAD_META", &other)),
        };
        let end = meta.offset + meta.length;
        let mut at = meta.offset;
        let mut acked = at;
        progress(&meta, at);
        // Acknowledging every half window keeps the other half in flight.
        let ack_every = u64::from(meta.window / 2).max(1);
        while at < end {
            let deadline = Instant::now() + self.timeout;
            match self.next_session_event(Some(deadline))? {
                None => return Err(ClientError::Timeout),
                Some(Event::Push(ServerFrame::FileChunk(c))) if c.download == id => {
                    if c.offset != at {
                        return Err(ClientError::Protocol(format!("FILE_CHUNK at {} where {at} was due", c.offset)));
                    }
                    sink.write_all(&c.data).map_err(io_error)?;
                    at += c.data.len() as u64;
                    progress(&meta, at);
                    if at - acked >= ack_every && at < end {
                        self.session.send(&ClientFrame::DownloadAck(DownloadAck { download: id, received: at }))?;
                        self.flush()?;
                        acked = at;
                    }
                }
                Some(Event::Failed { request_id, error }) if request_id == id => {
                    return Err(ClientError::Server(error))
                }
                Some(Event::Goodbye(g)) => return Err(ClientError::Closed(Some(g))),
                Some(other) => self.queue.push_back(other),
            }
        }
        Ok(meta)
    }

    /// `FORWARD`: copies message `seq` of `room` (and its file) into `to_room`.
    pub fn forward(
        &mut self,
        room: impl Into<RoomId>,
        seq: impl Into<Seq>,
        to_room: impl Into<RoomId>,
    ) -> Result<Posted, ClientError> {
        self.posted(ClientFrame::Forward(Forward { room: room.into(), seq: seq.into(), to_room: to_room.into() }))
    }

    /// Sends a request answered by `POSTED` (the message actions) and returns it.
    fn posted(&mut self, frame: ClientFrame) -> Result<Posted, ClientError> {
        match self.request(&frame)? {
            ServerFrame::Posted(p) => Ok(p),
            other => Err(unexpected("POSTED", &other)),
        }
    }

    /// `EDIT`: replaces the text of one of the user's messages.
    pub fn edit(
        &mut self,
        room: impl Into<RoomId>,
        target: impl Into<Seq>,
        idempotency_key: &str,
        text: &str,
    ) -> Result<Posted, ClientError> {
        let (room, target) = (room.into(), target.into());
        self.posted(ClientFrame::Edit(Edit {
            room,
            target,
            idempotency_key: idempotency_key.to_string(),
            text: text.to_string(),
        }))
    }

    /// `DELETE`: deletes a message.
    pub fn delete(&mut self, room: impl Into<RoomId>, target: impl Into<Seq>) -> Result<Posted, ClientError> {
        self.posted(ClientFrame::Delete(DeleteMessage { room: room.into(), target: target.into() }))
    }

    /// `REACT`: adds (or with `remove`, takes back) a reaction.
    pub fn react(
        &mut self,
        room: impl Into<RoomId>,
        target: impl Into<Seq>,
        emoji: &str,
        remove: bool,
    ) -> Result<Posted, ClientError> {
        let (room, target, emoji) = (room.into(), target.into(), emoji.to_string());
        self.posted(ClientFrame::React(React { room, target, emoji, remove }))
    }

    /// `REPLY`: posts a message that answers `reply_to`.
    pub fn reply(
        &mut self,
        room: impl Into<RoomId>,
        reply_to: impl Into<Seq>,
        idempotency_key: &str,
        text: &str,
    ) -> Result<Posted, ClientError> {
        let (room, reply_to) = (room.into(), reply_to.into());
        self.posted(ClientFrame::Reply(Reply {
            room,
            reply_to,
            idempotency_key: idempotency_key.to_string(),
            text: text.to_string(),
        }))
    }

    /// `PIN`: pins (or with `remove`, unpins) a message.
    pub fn pin(
        &mut self,
        room: impl Into<RoomId>,
        target: impl Into<Seq>,
        remove: bool,
    ) -> Result<Posted, ClientError> {
        self.posted(ClientFrame::Pin(Pin { room: room.into(), target: target.into(), remove }))
    }

    /// `VIEW`: one page of messages in their current state, newest first, before `before` (0:
    /// the newest).
    pub fn view(
        &mut self,
        room: impl Into<RoomId>,
        before: impl Into<Seq>,
        limit: u32,
    ) -> Result<MessagePage, ClientError> {
        let (room, before) = (room.into(), before.into());
        match self.request(&ClientFrame::View(View { room, before, limit }))? {
            ServerFrame::MessagePage(p) => Ok(p),
            other => Err(unexpected("MESSAGE_PAGE", &other)),
        }
    }

    /// `SEARCH`: one page of the messages with every word of `query`, newest first, before
    /// `before` (0: the newest).
    pub fn search(
        &mut self,
        room: impl Into<RoomId>,
        query: &str,
        before: impl Into<Seq>,
        limit: u32,
    ) -> Result<MessagePage, ClientError> {
        let (room, before, query) = (room.into(), before.into(), query.to_string());
        match self.request(&ClientFrame::Search(Search { room, query, before, limit }))? {
            ServerFrame::MessagePage(p) => Ok(p),
            other => Err(unexpected("MESSAGE_PAGE", &other)),
        }
    }

    /// `RESTORE`: one page of a room's log from `cursor`, oldest first (after it; 0: from the
    /// first delta) or newest first (before it; 0: from the head).
    pub fn restore(
        &mut self,
        room: impl Into<RoomId>,
        order: RestoreOrder,
        cursor: impl Into<Seq>,
        limit: u32,
    ) -> Result<RestorePage, ClientError> {
        let (room, cursor) = (room.into(), cursor.into());
        match self.request(&ClientFrame::Restore(Restore { room, order, cursor, limit }))? {
            ServerFrame::RestorePage(p) => Ok(p),
            other => Err(unexpected("RESTORE_PAGE", &other)),
        }
    }

    /// Restores a room's whole log with `RESTORE`, page after page of `page_size` deltas (0: the
    /// server's default), handing each delta to `on_delta` exactly once, in `order`. A
    /// `RATE_LIMITED` refusal is waited out for as long as it says (see
    /// [`chime_protocol::ErrorBody::retry_after_ms`]) and the same page asked again. Every page
    /// is checked to continue exactly where the one before stopped, so a gap or a repeat is a
    /// `Protocol` error rather than a silently incomplete history. An error from `on_delta` ends
    /// the restore with that error.
    pub fn restore_all(
        &mut self,
        room: impl Into<RoomId>,
        order: RestoreOrder,
        page_size: u32,
        on_delta: &mut dyn FnMut(&Delta) -> Result<(), ClientError>,
    ) -> Result<Restored, ClientError> {
        let room = room.into();
        let newest_first = order == RestoreOrder::NEWEST_FIRST;
        let mut done = Restored { head: Seq::ZERO, deltas: 0, pages: 0, waits: 0 };
        let mut cursor = Seq::ZERO;
        // The seq the next delta must have; unknown before a newest-first restore's first page.
        let mut expect: Option<Seq> = (!newest_first).then_some(Seq(1));
        let mut refused = 0;
        loop {
            let page = match self.restore(room, order, cursor, page_size) {
                Ok(page) => page,
                Err(ClientError::Server(e)) if e.code == ErrorCode::RATE_LIMITED && refused < MAX_RATE_LIMITED => {
                    refused += 1;
                    done.waits += 1;
                    let wait =
                        e.retry_after_ms().map_or(RATE_LIMIT_WAIT, Duration::from_millis).min(MAX_RATE_LIMIT_WAIT);
                    log::info!("restoring room {room}: {e}; waiting {} ms", wait.as_millis());
                    std::thread::sleep(wait);
                    continue;
                }
                Err(e) => return Err(e),
            };
            refused = 0;
            if done.pages == 0 {
                done.head = page.head;
                if newest_first {
                    expect = Some(page.head);
                }
            }
            done.pages += 1;
            for delta in &page.deltas {
                if Some(delta.seq) != expect || delta.room != room {
                    return Err(ClientError::Protocol(format!(
                        "RESTORE of room {room} gave seq {} of room {} where seq {} was due",
                        delta.seq,
                        delta.room,
                        expect.map_or_else(|| "?".into(), |s| s.to_string())
                    )));
                }
                on_delta(delta)?;
                done.deltas += 1;
                expect = Some(if newest_first { delta.seq.prev() } else { delta.seq.next() });
            }
            match page.next {
                // A page that does not move the cursor would be asked for forever.
                Some(next) if page.deltas.last().map(|d| d.seq) == Some(next) => cursor = next,
                Some(next) => {
                    return Err(ClientError::Protocol(format!(
                        "RESTORE of room {room} sent next cursor {next} for a page that does not end there"
                    )))
                }
                None => return Ok(done),
            }
        }
    }

    /// `HISTORY`: one page of a room's deltas after `after`.
    pub fn history(
        &mut self,
        room: impl Into<RoomId>,
        after: impl Into<Seq>,
        limit: u32,
    ) -> Result<DeltaPage, ClientError> {
        let (room, after) = (room.into(), after.into());
        match self.request(&ClientFrame::History(History { room, after, limit }))? {
            ServerFrame::DeltaPage(p) => Ok(p),
            other => Err(unexpected("DELTA_PAGE", &other)),
        }
    }

    /// `SYNC`: streams every delta after each cursor through `on_delta`, in seq order per room,
    /// and returns the `SYNC_DONE`. `DELTA` pushes arriving meanwhile are queued for
    /// [`Client::recv`]; after `SYNC_DONE` they continue exactly where the sync stopped.
    ///
    /// The timeout applies between pages, not to the whole sync. The session checks that each
    /// page continues its room from the cursor: a gap or a repeat is a `Protocol` error rather
    /// than silently lost or doubled messages.
    pub fn sync(
        &mut self,
        cursors: &[RoomCursor],
        page_size: u32,
        on_delta: &mut dyn FnMut(&Delta),
    ) -> Result<SyncDone, ClientError> {
        let id = self.send(&ClientFrame::Sync(Sync { rooms: cursors.to_vec(), page_size }))?;
        loop {
            let deadline = Instant::now() + self.timeout;
            match self.await_reply(id, deadline)? {
                ServerFrame::DeltaPage(page) => {
                    for delta in &page.deltas {
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
        let pos = self.queue.iter().position(|e| matches!(e, Event::Failed { .. }))?;
        match self.queue.remove(pos) {
            Some(Event::Failed { error, .. }) => Some(ClientError::Server(error)),
            _ => None,
        }
    }

    /// Writes everything the session queued.
    fn flush(&mut self) -> Result<(), ClientError> {
        if !self.session.has_output() {
            return Ok(());
        }
        let out = self.session.pending_output();
        let n = out.len();
        self.transport.write_all(out).map_err(io_error)?;
        self.session.consume_output(n);
        Ok(())
    }

    /// Reads until the reply with request id `id` arrives, queueing every other event.
    fn await_reply(&mut self, id: u32, deadline: Instant) -> Result<ServerFrame, ClientError> {
        loop {
            match self.next_session_event(Some(deadline))? {
                None => return Err(ClientError::Timeout),
                Some(Event::Reply { request_id, frame }) if request_id == id => return Ok(frame),
                Some(Event::Failed { request_id, error }) if request_id == id => {
                    return Err(ClientError::Server(error))
                }
                Some(Event::Invalid { request_id, error }) if request_id == id => return Err(error.into()),
                Some(Event::Goodbye(g)) => return Err(ClientError::Closed(Some(g))),
                Some(other) => self.queue.push_back(other),
            }
        }
    }

    /// The session's next event, reading (and writing what reading makes it queue: pongs,
    /// resyncs, heartbeat pings) until one comes. `Ok(None)` once `deadline` passes; the session's
    /// close reason once it is closed and every event was taken.
    fn next_session_event(&mut self, deadline: Option<Instant>) -> Result<Option<Event>, ClientError> {
        // Even an expired deadline gets one short read, so `recv(Some(Duration::ZERO))` polls.
        let mut first_read = true;
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            if let Some(event) = self.session.poll_event() {
                return Ok(Some(event));
            }
            if let Some(why) = self.session.closed() {
                return Err(why.clone().into());
            }
            let now = Instant::now();
            match self.session.on_tick(now) {
                Tick::Pinged => self.flush()?,
                Tick::Dead => continue,
                Tick::Alive => {}
            }
            let mut wait = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(now) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ if first_read => Some(Duration::from_millis(1)),
                    _ => return Ok(None),
                },
            };
            if let Some(tick) = self.session.next_tick() {
                // Never a zero wait: a zero socket timeout means "block forever" or an error to std.
                let until = tick.saturating_duration_since(now).max(Duration::from_millis(1));
                wait = Some(wait.map_or(until, |w| w.min(until)));
            }
            first_read = false;
            match self.transport.read(&mut chunk, wait) {
                Ok(0) => self.session.handle_eof(),
                Ok(n) => {
                    self.session.handle_bytes(&chunk[..n], Instant::now());
                    self.flush()?;
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
    }
}

fn credentials(user: &str, password: &str, user_agent: &str) -> Credentials {
    Credentials { user: user.to_string(), password: password.to_string(), user_agent: user_agent.to_string() }
}

fn unexpected(wanted: &str, got: &ServerFrame) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {}", got.frame_type()))
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

/// Either transport, with one read/write interface.
#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsTransport>),
}

impl Transport {
    /// Reads whatever arrives within `timeout` into `chunk`; `Ok(0)` means EOF.
    fn read(&mut self, chunk: &mut [u8], timeout: Option<Duration>) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => {
                tcp.set_read_timeout(timeout)?;
                read_retrying(tcp, chunk)
            }
            Transport::Tls(tls) => tls.read(chunk, timeout),
        }
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
