//! Ephemeral state: who is online or away, when each user was last seen, who watches whose
//! presence, and the typing throttle. Nothing here is written to the store: presence changes per
//! connection and typing per keystroke, and both are worthless a few seconds later.
//!
//! Presence is pushed only to connections that asked for it (`WATCH_PRESENCE` with the users a
//! client shows), never broadcast to a room: in a room of a million members a status change costs
//! what its watchers cost, not a million pushes. Typing goes to a room's online readers, at most
//! once per user and room every [`TYPING_EVERY`]. Both travel in the transport's ephemeral class,
//! which a connection short of queue space drops first.

use super::hub::Key;
use chime_protocol::{PresenceEntry, PresenceStatus};
use chime_storage::{RoomId, UserId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The least time between two typing notices of one connection in one room.
pub const TYPING_EVERY: Duration = Duration::from_secs(3);

/// Most users one connection watches.
pub const MAX_WATCHED: usize = 500;

/// Rooms whose typing throttle a connection remembers (older ones are forgotten first).
const TYPING_ROOMS: usize = 16;

/// Presence and typing state.
#[derive(Debug, Default)]
pub struct Presence {
    /// Users with a live connection: their status (online or away).
    status: HashMap<UserId, PresenceStatus>,
    /// When each user seen since start was last connected, Unix milliseconds.
    last_seen: HashMap<UserId, i64>,
    /// Who watches a user.
    watchers: HashMap<UserId, Vec<Key>>,
    /// Whom a connection watches.
    watching: HashMap<Key, Vec<UserId>>,
    /// Per connection, the last typing notice per room.
    typing: HashMap<Key, Vec<(RoomId, Instant)>>,
}

impl Presence {
    /// A user's presence now.
    pub fn of(&self, user: UserId, now_ms: i64) -> PresenceEntry {
        match self.status.get(&user) {
            Some(&status) => PresenceEntry { user_id: user, status, last_seen_ms: now_ms },
            None => PresenceEntry {
                user_id: user,
                status: PresenceStatus::OFFLINE,
                last_seen_ms: self.last_seen.get(&user).copied().unwrap_or(0),
            },
        }
    }

    /// A connection of `user` logged in; `first` when it is the user's only one. Returns the new
    /// presence to push when the user came online.
    pub fn connected(&mut self, user: UserId, first: bool, now_ms: i64) -> Option<PresenceEntry> {
        self.last_seen.insert(user, now_ms);
        if first || !self.status.contains_key(&user) {
            self.status.insert(user, PresenceStatus::ONLINE);
            return Some(self.of(user, now_ms));
        }
        None
    }

    /// A connection of `user` logged out or closed; `last` when the user has no other. Forgets the
    /// connection's watches and throttle; returns the new presence to push when the user went
    /// offline.
    pub fn disconnected(&mut self, user: UserId, key: Key, last: bool, now_ms: i64) -> Option<PresenceEntry> {
        self.unwatch_all(key);
        self.typing.remove(&key);
        self.last_seen.insert(user, now_ms);
        if last {
            self.status.remove(&user);
            return Some(self.of(user, now_ms));
        }
        None
    }

    /// The user set a status; returns it to push when it changed.
    pub fn set(&mut self, user: UserId, status: PresenceStatus, now_ms: i64) -> Option<PresenceEntry> {
        let slot = self.status.get_mut(&user)?;
        if *slot == status {
            return None;
        }
        *slot = status;
        self.last_seen.insert(user, now_ms);
        Some(self.of(user, now_ms))
    }

    /// Replaces what `key` watches (the first [`MAX_WATCHED`] users).
    pub fn watch(&mut self, key: Key, users: &[UserId]) {
        self.unwatch_all(key);
        let mut list: Vec<UserId> = Vec::new();
        for &u in users.iter().take(MAX_WATCHED) {
            if !list.contains(&u) {
                list.push(u);
                self.watchers.entry(u).or_default().push(key);
            }
        }
        self.watching.insert(key, list);
    }

    fn unwatch_all(&mut self, key: Key) {
        for u in self.watching.remove(&key).unwrap_or_default() {
            if let Some(keys) = self.watchers.get_mut(&u) {
                keys.retain(|&k| k != key);
                if keys.is_empty() {
                    self.watchers.remove(&u);
                }
            }
        }
    }

    /// The connections watching `user`.
    pub fn watchers(&self, user: UserId) -> &[Key] {
        self.watchers.get(&user).map_or(&[], Vec::as_slice)
    }

    /// Whether `key` may announce typing in `room` now (and records that it did).
    pub fn may_type(&mut self, key: Key, room: RoomId, now: Instant) -> bool {
        let rooms = self.typing.entry(key).or_default();
        match rooms.iter_mut().find(|(r, _)| *r == room) {
            Some((_, last)) if now.saturating_duration_since(*last) < TYPING_EVERY => false,
            Some((_, last)) => {
                *last = now;
                true
            }
            None => {
                if rooms.len() >= TYPING_ROOMS {
                    rooms.remove(0);
                }
                rooms.push((room, now));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_follows_the_first_and_last_connection() {
        let mut p = Presence::default();
        let ann = UserId(1);
        assert_eq!(p.of(ann, 5).status, PresenceStatus::OFFLINE);
        assert_eq!(p.connected(ann, true, 10).map(|e| e.status), Some(PresenceStatus::ONLINE));
        assert_eq!(p.connected(ann, false, 11), None, "a second device changes nothing");
        assert_eq!(p.set(ann, PresenceStatus::AWAY, 12).map(|e| e.status), Some(PresenceStatus::AWAY));
        assert_eq!(p.set(ann, PresenceStatus::AWAY, 13), None);
        assert_eq!(p.disconnected(ann, 1, false, 14), None);
        let gone = p.disconnected(ann, 2, true, 15).expect("offline");
        assert_eq!((gone.status, gone.last_seen_ms), (PresenceStatus::OFFLINE, 15));
        assert_eq!(p.set(ann, PresenceStatus::ONLINE, 16), None, "offline users set nothing");
    }

    #[test]
    fn watches_are_replaced_bounded_and_forgotten_with_the_connection() {
        let mut p = Presence::default();
        let many: Vec<UserId> = (1..=600).map(UserId).collect();
        p.watch(7, &many);
        assert_eq!(p.watchers(UserId(500)), [7]);
        assert!(p.watchers(UserId(501)).is_empty(), "at most 500");
        p.watch(7, &[UserId(9)]);
        assert!(p.watchers(UserId(1)).is_empty());
        p.disconnected(UserId(3), 7, true, 0);
        assert!(p.watchers(UserId(9)).is_empty());
    }

    #[test]
    fn typing_is_throttled_per_room() {
        let mut p = Presence::default();
        let t0 = Instant::now();
        assert!(p.may_type(1, RoomId(5), t0));
        assert!(!p.may_type(1, RoomId(5), t0 + Duration::from_secs(1)));
        assert!(p.may_type(1, RoomId(6), t0 + Duration::from_secs(1)));
        assert!(p.may_type(1, RoomId(5), t0 + TYPING_EVERY));
    }
}
