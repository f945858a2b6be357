//! Which cached content was used least recently: an in-memory order over the cache's objects,
//! cheap on every access (a map update and a B-tree move, no I/O, no directory scan).
//!
//! Ticks only grow. The index stores each object's last tick, flushed in batches by the
//! background thread, so after a restart the order is rebuilt from the index as it was at the
//! last flush (a few seconds of accesses may be forgotten: the order is a heuristic, losing a
//! little of it costs a slightly worse choice, never content).

use crate::node::Sha256;
use std::collections::{BTreeMap, HashMap};

/// Cached objects ordered by last use.
#[derive(Debug, Default)]
pub struct Lru {
    /// tick -> object; the first entry is the least recently used.
    order: BTreeMap<u64, Sha256>,
    /// object -> (its tick, its size).
    entries: HashMap<Sha256, (u64, u64)>,
    /// The next tick to hand out.
    next: u64,
    /// The sum of the sizes.
    bytes: u64,
    /// Objects touched since the last [`Lru::take_dirty`], for the index.
    dirty: HashMap<Sha256, u64>,
}

impl Lru {
    /// An empty order whose ticks start after `last_tick`.
    pub fn starting_after(last_tick: u64) -> Lru {
        Lru { next: last_tick + 1, ..Lru::default() }
    }

    /// Makes every later use tick at least `tick` (a mark recorded by an earlier run).
    pub fn advance_to(&mut self, tick: u64) {
        self.next = self.next.max(tick);
    }

    /// Adds an object with a known tick (from the index, at open); the caller gives them in any
    /// order. An object already present is left as it is.
    pub fn restore(&mut self, sha: Sha256, size: u64, tick: u64) {
        if self.entries.contains_key(&sha) {
            return;
        }
        // Ticks from the index are unique, but a damaged index must not lose an entry.
        let mut tick = tick;
        while self.order.contains_key(&tick) {
            tick += 1;
        }
        self.next = self.next.max(tick + 1);
        self.order.insert(tick, sha);
        self.entries.insert(sha, (tick, size));
        self.bytes += size;
    }

    /// Marks `sha` (of `size` bytes) as used now, adding it if absent; returns its new tick.
    pub fn touch(&mut self, sha: Sha256, size: u64) -> u64 {
        let tick = self.next;
        self.next += 1;
        if let Some((old, old_size)) = self.entries.insert(sha, (tick, size)) {
            self.order.remove(&old);
            self.bytes -= old_size;
        }
        self.order.insert(tick, sha);
        self.bytes += size;
        self.dirty.insert(sha, tick);
        tick
    }

    /// Removes `sha`; returns its size if it was present.
    pub fn remove(&mut self, sha: Sha256) -> Option<u64> {
        let (tick, size) = self.entries.remove(&sha)?;
        self.order.remove(&tick);
        self.bytes -= size;
        self.dirty.remove(&sha);
        Some(size)
    }

    /// Whether `sha` is cached.
    pub fn contains(&self, sha: Sha256) -> bool {
        self.entries.contains_key(&sha)
    }

    /// The size of `sha`, if cached.
    pub fn size(&self, sha: Sha256) -> Option<u64> {
        self.entries.get(&sha).map(|&(_, size)| size)
    }

    /// The tick of `sha`'s last use, if cached.
    pub fn tick(&self, sha: Sha256) -> Option<u64> {
        self.entries.get(&sha).map(|&(tick, _)| tick)
    }

    /// Bytes cached.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Objects cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tick the next use will get.
    pub fn now(&self) -> u64 {
        self.next
    }

    /// Up to `n` objects, least recently used first, with their sizes and ticks.
    pub fn oldest(&self, n: usize) -> Vec<(Sha256, u64, u64)> {
        self.order.iter().take(n).map(|(&tick, &sha)| (sha, self.entries[&sha].1, tick)).collect()
    }

    /// The accesses since the last call, for the index to persist.
    pub fn take_dirty(&mut self) -> Vec<(Sha256, u64)> {
        self.dirty.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u8) -> Sha256 {
        Sha256([n; 32])
    }

    #[test]
    fn the_least_recently_used_comes_first_and_sizes_add_up() {
        let mut lru = Lru::starting_after(0);
        lru.touch(sha(1), 10);
        lru.touch(sha(2), 20);
        lru.touch(sha(3), 30);
        assert_eq!(lru.bytes(), 60);
        lru.touch(sha(1), 10);
        let order: Vec<Sha256> = lru.oldest(10).into_iter().map(|(s, _, _)| s).collect();
        assert_eq!(order, [sha(2), sha(3), sha(1)]);
        assert_eq!(lru.remove(sha(3)), Some(30));
        assert_eq!(lru.remove(sha(3)), None);
        assert_eq!((lru.bytes(), lru.len()), (30, 2));
        assert_eq!(lru.take_dirty().len(), 2);
        assert!(lru.take_dirty().is_empty());
    }

    #[test]
    fn restored_ticks_keep_their_order_and_new_uses_come_after() {
        let mut lru = Lru::starting_after(0);
        lru.restore(sha(1), 1, 50);
        lru.restore(sha(2), 1, 7);
        lru.restore(sha(3), 1, 7); // a duplicate tick from a damaged index
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.oldest(1)[0].0, sha(2));
        assert!(lru.touch(sha(2), 1) > 50);
        assert_eq!(lru.oldest(1)[0].0, sha(3));
        assert!(lru.take_dirty().iter().all(|(s, _)| *s == sha(2)));
    }
}
