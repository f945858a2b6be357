-- Read receipts, unread counts and mentions. Keep in step with ../postgres/V11__receipts.sql.

-- Per member of a room (or reader of a channel) who ever reported: the last seq delivered to one
-- of their devices and the last seq they read. No row: nothing delivered or read yet. Channels
-- have no member rows, so this is a table of its own: a million-member server costs rows only
-- for members who read.
CREATE TABLE read_cursors (
    room_id       INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id       INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    read_seq      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id)
) STRICT, WITHOUT ROWID;

-- `@name` in a message, resolved when it was posted: who was mentioned where. Keyed by user
-- first, so counting a user's mentions past their read cursor in a room is one range.
CREATE TABLE mentions (
    user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    room_id   INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq       INTEGER NOT NULL,
    author_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, seq)
) STRICT, WITHOUT ROWID;
