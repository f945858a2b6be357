-- Read receipts, unread counts and mentions. Keep in step with ../sqlite/V11__receipts.sql,
-- which says why each table is shaped as it is.
CREATE TABLE read_cursors (
    room_id       BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id       BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    delivered_seq BIGINT NOT NULL DEFAULT 0,
    read_seq      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id)
);

CREATE TABLE mentions (
    user_id   BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    room_id   BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq       BIGINT NOT NULL,
    author_id BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, seq)
);
