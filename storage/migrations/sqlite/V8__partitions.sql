-- The log's partitions: partition P of a room holds seqs P*part_size+1 ..= (P+1)*part_size, and
-- delta_partitions records, per partition that has deltas, its seq range, time range and count,
-- kept by the store in the transaction that appends (chime_storage::partition). A room keeps the
-- partition size it was created with; rooms that exist now get the default. Keep in step with
-- ../postgres/V8__partitions.sql.
ALTER TABLE rooms ADD COLUMN part_size INTEGER NOT NULL DEFAULT 10000 CHECK (part_size > 0);

CREATE TABLE delta_partitions (
    room_id   INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    part      INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    first_ts  INTEGER NOT NULL,
    last_ts   INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    PRIMARY KEY (room_id, part)
) STRICT, WITHOUT ROWID;

INSERT INTO delta_partitions (room_id, part, first_seq, last_seq, first_ts, last_ts, count)
SELECT d.room_id, (d.seq - 1) / r.part_size, min(d.seq), max(d.seq), min(d.created_at), max(d.created_at), count(*)
FROM deltas d JOIN rooms r ON r.id = d.room_id
GROUP BY d.room_id, (d.seq - 1) / r.part_size;
