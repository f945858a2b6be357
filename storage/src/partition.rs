//! A room's log in partitions of a fixed number of deltas, recorded in `delta_partitions`.
//!
//! Partition `p` of a room whose partition size is `n` holds seqs `p*n + 1 ..= (p+1)*n`. Seqs
//! have no gaps, so the partition of any seq is arithmetic and a page of at most `n` deltas read
//! from any cursor lies in one or two partitions; `delta_partitions` records, per partition that
//! has deltas, its first and last seq, its time range and its count, kept up to date in the
//! transaction that appends the deltas (one upsert per partition a write touches: one per room per
//! group commit, not one per delta). It is the log's table of contents: where a time falls, how
//! much a partition holds, what can be archived or dropped whole.
//!
//! A room's partition size is fixed when the room is created (`rooms.part_size`, from
//! [`crate::OpenOptions::partition_size`]), so changing the setting never renumbers an existing
//! log. The rows are computed here, once for both stores ([`summarize`]); each store only upserts
//! them.

use crate::{DeltaRecord, RoomId, Seq};

/// Deltas per partition of a room created with the default options.
pub const DEFAULT_PARTITION_SIZE: u64 = 10_000;

/// One partition of a room's log, as `delta_partitions` holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRecord {
    /// The room.
    pub room: RoomId,
    /// The partition's number: seqs `part*size + 1 ..= (part+1)*size`.
    pub part: u64,
    /// Its first seq written.
    pub first_seq: Seq,
    /// Its last seq written.
    pub last_seq: Seq,
    /// The earliest commit time in it, Unix milliseconds.
    pub first_ts_ms: i64,
    /// The latest commit time in it, Unix milliseconds.
    pub last_ts_ms: i64,
    /// How many deltas it holds.
    pub count: u64,
}

/// The partition holding `seq` in a log of `size`-delta partitions (a size of 0 counts as 1).
pub fn part_of(seq: Seq, size: u64) -> u64 {
    seq.get().saturating_sub(1) / size.max(1)
}

/// What newly appended deltas add to their partitions: one row per (room, partition) touched, in
/// first-appearance order, each covering only these deltas (stores merge it into the stored row:
/// least first seq and time, greatest last seq and time, counts added). `size` gives each room's
/// partition size.
pub(crate) fn summarize<'a>(
    deltas: impl IntoIterator<Item = &'a DeltaRecord>,
    size: impl Fn(RoomId) -> u64,
) -> Vec<PartitionRecord> {
    let mut out: Vec<PartitionRecord> = Vec::new();
    for d in deltas {
        let part = part_of(d.seq, size(d.room));
        // A batch touches few (room, partition) pairs, and the latest is the likeliest match.
        match out.iter_mut().rev().find(|p| p.room == d.room && p.part == part) {
            Some(p) => {
                p.first_seq = p.first_seq.min(d.seq);
                p.last_seq = p.last_seq.max(d.seq);
                p.first_ts_ms = p.first_ts_ms.min(d.ts_ms);
                p.last_ts_ms = p.last_ts_ms.max(d.ts_ms);
                p.count += 1;
            }
            None => out.push(PartitionRecord {
                room: d.room,
                part,
                first_seq: d.seq,
                last_seq: d.seq,
                first_ts_ms: d.ts_ms,
                last_ts_ms: d.ts_ms,
                count: 1,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RecordKind, UserId};

    fn delta(room: u64, seq: u64, ts_ms: i64) -> DeltaRecord {
        DeltaRecord {
            room: RoomId(room),
            seq: Seq(seq),
            kind: RecordKind::MESSAGE,
            author_id: UserId(1),
            author: "a".into(),
            ts_ms,
            body: String::new(),
            target: None,
        }
    }

    #[test]
    fn partitions_are_seq_ranges_of_the_rooms_size() {
        assert_eq!(part_of(Seq(1), 10), 0);
        assert_eq!(part_of(Seq(10), 10), 0);
        assert_eq!(part_of(Seq(11), 10), 1);
        assert_eq!(part_of(Seq(0), 10), 0);
        assert_eq!(part_of(Seq(5), 0), 4, "a size of 0 counts as 1");
    }

    #[test]
    fn a_batch_adds_one_row_per_room_and_partition() {
        let batch = [delta(1, 9, 5), delta(2, 3, 6), delta(1, 10, 7), delta(1, 11, 8), delta(1, 12, 4)];
        let rows = summarize(&batch, |room| if room == RoomId(1) { 10 } else { 100 });
        let brief: Vec<_> =
            rows.iter().map(|p| (p.room.get(), p.part, p.first_seq.get(), p.last_seq.get(), p.count)).collect();
        assert_eq!(brief, [(1, 0, 9, 10, 2), (2, 0, 3, 3, 1), (1, 1, 11, 12, 2)]);
        assert_eq!((rows[2].first_ts_ms, rows[2].last_ts_ms), (4, 8), "times are a range, not the ends");
    }
}
