//! Loss and duplicate accounting for pushes a receiver gets in one room.
//!
//! The server publishes each room's deltas to each member connection in seq order with no gaps and
//! no repeats. A [`SeqLedger`] keeps, per receiver and room, the runs of consecutive seqs seen and
//! counts repeats; at the end of a run, [`Tally::add`] compares it with the window of seqs that
//! was posted in the room while measuring, so a delta that never arrived counts as lost even when
//! it was the last one (which a gap check alone would miss).

use serde::Serialize;

/// What one receiver saw of one room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqLedger {
    /// Inclusive runs of consecutive seqs, ascending and disjoint.
    runs: Vec<(u64, u64)>,
    /// Seqs that were not above the last one seen (repeats, or out of order).
    duplicates: u64,
    /// Seqs skipped over by a jump forward.
    gaps: u64,
}

/// How one observed seq related to what came before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The first seq, or the one right after the last.
    InOrder,
    /// A jump forward over this many seqs.
    Gap(u64),
    /// Not above the last seq seen.
    Duplicate,
}

impl SeqLedger {
    /// Records one delivered seq.
    pub fn observe(&mut self, seq: u64) -> Observed {
        match self.runs.last_mut() {
            None => {
                self.runs.push((seq, seq));
                Observed::InOrder
            }
            Some(run) if seq == run.1 + 1 => {
                run.1 = seq;
                Observed::InOrder
            }
            Some(run) if seq <= run.1 => {
                self.duplicates += 1;
                Observed::Duplicate
            }
            Some(run) => {
                let missing = seq - run.1 - 1;
                self.gaps += missing;
                self.runs.push((seq, seq));
                Observed::Gap(missing)
            }
        }
    }

    /// The highest seq seen.
    pub fn last(&self) -> Option<u64> {
        self.runs.last().map(|r| r.1)
    }

    /// Repeated (or backwards) deliveries.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Seqs jumped over between the first and the last seen.
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// How many distinct seqs in `lo..=hi` were seen.
    pub fn received_in(&self, lo: u64, hi: u64) -> u64 {
        self.runs
            .iter()
            .map(|&(a, b)| {
                let (a, b) = (a.max(lo), b.min(hi));
                if a <= b {
                    b - a + 1
                } else {
                    0
                }
            })
            .sum()
    }
}

/// Deliveries expected, received, lost and duplicated, summed over receivers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Deliveries that should have happened in the window.
    pub expected: u64,
    /// Distinct deliveries in the window that happened.
    pub received: u64,
    /// `expected - received`.
    pub lost: u64,
    /// Repeats, over the whole run.
    pub duplicated: u64,
}

impl Tally {
    /// Adds one receiver's ledger for a room whose window was `lo..=hi` (`None`: nothing posted).
    pub fn add(&mut self, ledger: &SeqLedger, window: Option<(u64, u64)>) {
        self.duplicated += ledger.duplicates();
        if let Some((lo, hi)) = window {
            let expected = hi.saturating_sub(lo) + 1;
            let received = ledger.received_in(lo, hi);
            self.expected += expected;
            self.received += received;
            self.lost += expected - received;
        }
    }

    /// Adds another tally.
    pub fn merge(&mut self, other: &Tally) {
        self.expected += other.expected;
        self.received += other.received;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_loses_nothing() {
        let mut l = SeqLedger::default();
        for s in 5..=100 {
            assert_eq!(l.observe(s), Observed::InOrder);
        }
        let mut t = Tally::default();
        t.add(&l, Some((10, 100)));
        assert_eq!(t, Tally { expected: 91, received: 91, lost: 0, duplicated: 0 });
        assert_eq!(l.last(), Some(100));
    }

    #[test]
    fn gaps_repeats_and_a_missing_tail() {
        let mut l = SeqLedger::default();
        for s in [1, 2, 3, 3, 6, 7, 2, 8] {
            l.observe(s);
        }
        assert_eq!(l.gaps(), 2);
        assert_eq!(l.duplicates(), 2);
        // Window 1..=10: 4, 5, 9 and 10 never arrived.
        let mut t = Tally::default();
        t.add(&l, Some((1, 10)));
        assert_eq!(t, Tally { expected: 10, received: 6, lost: 4, duplicated: 2 });
    }

    #[test]
    fn nothing_received_is_all_lost_and_no_window_expects_nothing() {
        let mut t = Tally::default();
        t.add(&SeqLedger::default(), Some((3, 4)));
        t.add(&SeqLedger::default(), None);
        assert_eq!(t, Tally { expected: 2, received: 0, lost: 2, duplicated: 0 });
    }

    #[test]
    fn observe_reports_what_happened() {
        let mut l = SeqLedger::default();
        assert_eq!(l.observe(4), Observed::InOrder);
        assert_eq!(l.observe(5), Observed::InOrder);
        assert_eq!(l.observe(9), Observed::Gap(3));
        assert_eq!(l.observe(9), Observed::Duplicate);
        assert_eq!(l.received_in(0, u64::MAX), 3);
    }
}
