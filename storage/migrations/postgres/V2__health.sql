-- The row the health probe writes. Keep in step with ../sqlite/V2__health.sql.

-- PostgreSQL's `ping` is `SELECT 1`: a server that answers it accepts writes, unless it is
-- read-only, which every write then reports as unavailable. The table exists so that both
-- schemas stay the same and a written probe stays possible.
CREATE TABLE health (
    id        SMALLINT PRIMARY KEY CHECK (id = 1),
    pings     BIGINT   NOT NULL,
    pinged_at BIGINT   NOT NULL
);
INSERT INTO health (id, pings, pinged_at) VALUES (1, 0, 0);
