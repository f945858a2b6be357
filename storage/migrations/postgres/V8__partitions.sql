-- The log's partitions. Keep in step with ../sqlite/V8__partitions.sql.
--
-- Logical partitions, as on SQLite: partition P of a room holds seqs P*part_size+1 ..=
-- (P+1)*part_size, and delta_partitions records, per partition that has deltas, its seq range,
-- time range and count, kept by the store in the transaction that appends
-- (chime_storage::partition). A room keeps the partition size it was created with.
ALTER TABLE rooms ADD COLUMN part_size BIGINT NOT NULL DEFAULT 10000 CHECK (part_size > 0);

CREATE TABLE delta_partitions (
    room_id   BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    part      BIGINT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq  BIGINT NOT NULL,
    first_ts  BIGINT NOT NULL,
    last_ts   BIGINT NOT NULL,
    count     BIGINT NOT NULL,
    PRIMARY KEY (room_id, part)
);

-- Physical partitions: deltas becomes a table partitioned by hash of room_id into 16 tables,
-- keeping the primary key (room_id, seq). Every read and write of the log names its room, so it
-- is pruned to one table, whose index and heap hold a sixteenth of the log: "deltas of room R
-- after seq N" is an index range scan in one partition, and each partition is vacuumed and
-- cached on its own. (Partitioning by seq cannot be per room, and one table per room partition
-- would be millions of tables.) The existing rows are copied into the new table once.
ALTER TABLE deltas RENAME TO deltas_unpartitioned;
ALTER TABLE deltas_unpartitioned RENAME CONSTRAINT deltas_pkey TO deltas_unpartitioned_pkey;
ALTER TABLE deltas_unpartitioned RENAME CONSTRAINT deltas_idempotency TO deltas_unpartitioned_idempotency;

CREATE TABLE deltas (
    room_id         BIGINT   NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq             BIGINT   NOT NULL CHECK (seq > 0),
    kind            SMALLINT NOT NULL,
    author_id       BIGINT   NOT NULL REFERENCES users (id),
    body            TEXT     NOT NULL,
    created_at      BIGINT   NOT NULL,
    idempotency_key TEXT,
    target          BIGINT,
    PRIMARY KEY (room_id, seq),
    CONSTRAINT deltas_idempotency UNIQUE (room_id, author_id, idempotency_key)
) PARTITION BY HASH (room_id);

DO $$
BEGIN
    FOR i IN 0..15 LOOP
        EXECUTE format('CREATE TABLE deltas_%s PARTITION OF deltas FOR VALUES WITH (MODULUS 16, REMAINDER %s)',
                       lpad(i::text, 2, '0'), i);
    END LOOP;
END
$$;

INSERT INTO deltas (room_id, seq, kind, author_id, body, created_at, idempotency_key, target)
SELECT room_id, seq, kind, author_id, body, created_at, idempotency_key, target FROM deltas_unpartitioned;
DROP TABLE deltas_unpartitioned;

INSERT INTO delta_partitions (room_id, part, first_seq, last_seq, first_ts, last_ts, count)
SELECT d.room_id, (d.seq - 1) / r.part_size, min(d.seq), max(d.seq), min(d.created_at), max(d.created_at), count(*)
FROM deltas d JOIN rooms r ON r.id = d.room_id
GROUP BY d.room_id, (d.seq - 1) / r.part_size;

ANALYZE deltas;
