//! Who receives what: the subscription index, each room's last published seq, and the recent
//! membership changes, kept consistent in one place.
//!
//! The hub knows connections only by their key. It says *who* gets a room's pushes; the core
//! hands them over. (With several event loops, each loop would own its connections' transports
//! and the hub would return recipients per loop; nothing here assumes a single loop but the
//! `usize` key.)
//!
//! ## Why heads and a membership log
//!
//! A login reads the user's rooms and their heads on a worker; by the time the loop subscribes
//! the connection, the loop may have published later deltas of those rooms (a room's shard and
//! the auth worker race), and the user may have joined or left rooms (a JOIN on another device).
//! So the hub remembers, with a *stamp* (a counter of the loop's events), each room's last
//! published seq and every membership change, for as long as some login (or room creation, which
//! subscribes its creator the same way) that started before them is still in flight. When it
//! completes, [`Hub::since`] gives it what it missed: heads to catch up from, and joins and leaves
//! to replay. Entries older than every operation in flight, of rooms nobody is subscribed to, are
//! pruned ([`Hub::prune`]): the maps hold what in-flight work can still need, not every room ever
//! published.

use chime_storage::{RoomId, Seq, ServerId, SessionId, UserId};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// A connection, by its key in the loop's table.
pub type Key = usize;

/// A membership change the loop carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The user joined (its connections know the room up to this seq).
    Joined(Option<Seq>),
    /// The user left.
    Left,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    seq: Seq,
    stamp: u64,
}

/// The subscription index.
#[derive(Debug, Default)]
pub struct Hub {
    /// Online subscribers per room.
    rooms: HashMap<RoomId, Vec<Key>>,
    /// Logged-in connections per user.
    users: HashMap<UserId, Vec<Key>>,
    /// Logged-in connections per session.
    sessions: HashMap<SessionId, Vec<Key>>,
    /// The last seq the loop published per room, with when.
    heads: HashMap<RoomId, Head>,
    /// Membership changes, oldest first, with when.
    changes: VecDeque<(u64, UserId, RoomId, Change)>,
    /// Logged-in connections per server they follow (their user is a member): new channels of
    /// the server reach them. A server of a million members holds here only its online ones.
    servers: HashMap<ServerId, Vec<Key>>,
    /// The servers each connection follows (to leave them all when it goes).
    followed: HashMap<Key, Vec<ServerId>>,
    /// Channels created in servers, oldest first, with when: a login in flight follows the
    /// user's servers with a channel list read before them.
    channels: VecDeque<(u64, ServerId, RoomId)>,
    /// Operations in flight that will subscribe connections with a view read earlier (logins,
    /// room creations), by the stamp they started at: how many started then.
    pending: BTreeMap<u64, usize>,
    /// The last stamp handed out.
    stamp: u64,
}

impl Hub {
    /// A new stamp: a point in the loop's order of events.
    pub fn stamp(&mut self) -> u64 {
        self.stamp += 1;
        self.stamp
    }

    /// An operation that will subscribe connections later starts now; returns its stamp.
    pub fn begin(&mut self) -> u64 {
        let stamp = self.stamp();
        *self.pending.entry(stamp).or_insert(0) += 1;
        stamp
    }

    /// The operation that began at `stamp` is over.
    pub fn end(&mut self, stamp: u64) {
        if let Some(n) = self.pending.get_mut(&stamp) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&stamp);
            }
        }
    }

    /// The loop published `room` up to `seq`.
    pub fn published(&mut self, room: RoomId, seq: Seq) {
        let stamp = self.stamp();
        let head = self.heads.entry(room).or_insert(Head { seq, stamp });
        head.seq = head.seq.max(seq);
        head.stamp = stamp;
    }

    /// The last seq the loop published for `room`, if it still remembers.
    pub fn head(&self, room: RoomId) -> Option<Seq> {
        self.heads.get(&room).map(|h| h.seq)
    }

    /// The loop carried out a membership change of `user`.
    pub fn changed(&mut self, user: UserId, room: RoomId, change: Change) {
        let stamp = self.stamp();
        self.changes.push_back((stamp, user, room, change));
    }

    /// The membership changes of `user` carried out after `stamp`, oldest first.
    pub fn since(&self, stamp: u64, user: UserId) -> Vec<(RoomId, Change)> {
        self.changes.iter().filter(|(s, u, _, _)| *s > stamp && *u == user).map(|&(_, _, r, c)| (r, c)).collect()
    }

    /// Forgets what no operation in flight can need any more: heads of rooms nobody is subscribed
    /// to, and membership changes, older than the oldest operation in flight.
    pub fn prune(&mut self) {
        let oldest = self.pending.keys().next().copied().unwrap_or(u64::MAX);
        let rooms = &self.rooms;
        self.heads.retain(|room, head| head.stamp >= oldest || rooms.contains_key(room));
        while self.changes.front().is_some_and(|(s, ..)| *s < oldest) {
            self.changes.pop_front();
        }
        while self.channels.front().is_some_and(|(s, ..)| *s < oldest) {
            self.channels.pop_front();
        }
    }

    /// How many heads and membership changes are remembered (for tests and stats).
    pub fn remembered(&self) -> (usize, usize) {
        (self.heads.len(), self.changes.len())
    }

    /// Adds `key` to `room`'s subscribers (the caller keeps the connection's own room list and
    /// calls this only for a new subscription).
    pub fn subscribe(&mut self, room: RoomId, key: Key) {
        self.rooms.entry(room).or_default().push(key);
    }

    /// Takes `key` off `room`'s subscribers.
    pub fn unsubscribe(&mut self, room: RoomId, key: Key) {
        remove_key(&mut self.rooms, room, key);
    }

    /// The connections subscribed to `room`.
    pub fn subscribers(&self, room: RoomId) -> &[Key] {
        self.rooms.get(&room).map_or(&[], Vec::as_slice)
    }

    /// A connection logged in as `user` with `session`.
    pub fn log_in(&mut self, user: UserId, session: SessionId, key: Key) {
        self.users.entry(user).or_default().push(key);
        self.sessions.entry(session).or_default().push(key);
    }

    /// A connection logged in as `user` with `session` logged out (or closed).
    pub fn log_out(&mut self, user: UserId, session: SessionId, key: Key) {
        remove_key(&mut self.users, user, key);
        remove_key(&mut self.sessions, session, key);
        for server in self.followed.remove(&key).unwrap_or_default() {
            remove_key(&mut self.servers, server, key);
        }
    }

    /// `key` follows `server`'s new channels.
    pub fn follow_server(&mut self, server: ServerId, key: Key) {
        let followed = self.followed.entry(key).or_default();
        if !followed.contains(&server) {
            followed.push(server);
            self.servers.entry(server).or_default().push(key);
        }
    }

    /// `key` stops following `server`.
    pub fn unfollow_server(&mut self, server: ServerId, key: Key) {
        if let Some(followed) = self.followed.get_mut(&key) {
            followed.retain(|s| *s != server);
        }
        remove_key(&mut self.servers, server, key);
    }

    /// The connections following `server`.
    pub fn followers(&self, server: ServerId) -> Vec<Key> {
        self.servers.get(&server).cloned().unwrap_or_default()
    }

    /// The loop subscribed `server`'s followers to its new channel `room`.
    pub fn channel_created(&mut self, server: ServerId, room: RoomId) {
        let stamp = self.stamp();
        self.channels.push_back((stamp, server, room));
    }

    /// Channels created after `stamp` in any of `servers`.
    pub fn channels_since(&self, stamp: u64, servers: &[ServerId]) -> Vec<RoomId> {
        self.channels
            .iter()
            .filter(|(s, server, _)| *s > stamp && servers.contains(server))
            .map(|&(_, _, r)| r)
            .collect()
    }

    /// The connections of `user`.
    pub fn connections_of_user(&self, user: UserId) -> Vec<Key> {
        self.users.get(&user).cloned().unwrap_or_default()
    }

    /// The connections of `session`.
    pub fn connections_of_session(&self, session: SessionId) -> Vec<Key> {
        self.sessions.get(&session).cloned().unwrap_or_default()
    }

    /// Every session with a live connection.
    pub fn live_sessions(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }
}

/// Takes `key` off the list under `id`, dropping the list once it is empty.
fn remove_key<Id: std::hash::Hash + Eq>(lists: &mut HashMap<Id, Vec<Key>>, id: Id, key: Key) {
    if let Some(list) = lists.get_mut(&id) {
        if let Some(i) = list.iter().position(|&k| k == key) {
            list.swap_remove(i);
        }
        if list.is_empty() {
            lists.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R1: RoomId = RoomId(1);
    const R2: RoomId = RoomId(2);
    const R3: RoomId = RoomId(3);

    #[test]
    fn heads_and_changes_live_as_long_as_an_operation_may_need_them() {
        let mut hub = Hub::default();
        hub.published(R1, Seq(5));
        hub.prune();
        assert_eq!(hub.head(R1), None, "nobody subscribed and nothing in flight");
        let login = hub.begin();
        hub.published(R1, Seq(6));
        hub.changed(UserId(7), R2, Change::Joined(Some(Seq(3))));
        hub.changed(UserId(8), R2, Change::Left);
        hub.prune();
        assert_eq!(hub.head(R1), Some(Seq(6)), "a login in flight may have read an older head");
        assert_eq!(hub.since(login, UserId(7)), vec![(R2, Change::Joined(Some(Seq(3))))]);
        hub.end(login);
        hub.prune();
        assert_eq!(hub.remembered(), (0, 0));
        // A room with subscribers keeps its head.
        hub.subscribe(R3, 10);
        hub.published(R3, Seq(1));
        hub.prune();
        assert_eq!(hub.head(R3), Some(Seq(1)));
        hub.unsubscribe(R3, 10);
        assert!(hub.subscribers(R3).is_empty());
        hub.prune();
        assert_eq!(hub.head(R3), None);
    }

    #[test]
    fn users_and_sessions_index_connections() {
        let mut hub = Hub::default();
        hub.log_in(UserId(1), 100, 5);
        hub.log_in(UserId(1), 101, 6);
        hub.log_in(UserId(2), 102, 7);
        let mut mine = hub.connections_of_user(UserId(1));
        mine.sort_unstable();
        assert_eq!(mine, [5, 6]);
        assert_eq!(hub.connections_of_session(101), [6]);
        hub.log_out(UserId(1), 101, 6);
        assert_eq!(hub.connections_of_user(UserId(1)), [5]);
        assert!(hub.connections_of_session(101).is_empty());
        let mut live = hub.live_sessions();
        live.sort_unstable();
        assert_eq!(live, [100, 102]);
    }
}
