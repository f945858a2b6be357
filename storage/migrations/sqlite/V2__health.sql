-- The row the health probe writes. Keep in step with ../postgres/V2__health.sql.

-- `ping` rewrites this one row in a committed transaction: unlike a read, that proves the file is
-- writable, that no other process holds the write lock and that the disk has room for a WAL frame.
-- `pings` counts up so that every probe changes the page (SQLite writes no frame for an update
-- that leaves a page as it was, as two probes in the same millisecond would).
CREATE TABLE health (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    pings     INTEGER NOT NULL,
    pinged_at INTEGER NOT NULL
) STRICT;
INSERT INTO health (id, pings, pinged_at) VALUES (1, 0, 0);
