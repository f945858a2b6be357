-- Messages' current state, kept beside the immutable log: edits, deletes, reactions, pins and
-- replies are deltas (so SYNC and RESTORE carry them), and these tables hold what they add up
-- to, so that reading a message's state never replays its log and counting its reactions never
-- counts rows. Keep in step with ../postgres/V5__messages.sql.

-- The message an action delta acts on (EDIT, DELETE, REACT, UNREACT, PIN, UNPIN) or a REPLY
-- answers.
ALTER TABLE deltas ADD COLUMN target INTEGER;

-- A row only for a message something happened to: posting writes none.
CREATE TABLE message_state (
    room_id     INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    text        TEXT,              -- the latest edit's text; NULL: never edited (or deleted)
    edited_at   INTEGER,
    deleted_seq INTEGER,           -- the DELETE delta
    pinned_seq  INTEGER,           -- the PIN delta, NULL when not pinned
    PRIMARY KEY (room_id, seq)
) STRICT, WITHOUT ROWID;

-- Reaction counts, kept by increments as reactions come and go.
CREATE TABLE reactions (
    room_id INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    emoji   TEXT    NOT NULL,
    count   INTEGER NOT NULL CHECK (count > 0),
    PRIMARY KEY (room_id, seq, emoji)
) STRICT, WITHOUT ROWID;

-- Who reacted with what: one per user per emoji per message, and the REACT delta that added it.
CREATE TABLE reaction_users (
    room_id   INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq       INTEGER NOT NULL,
    emoji     TEXT    NOT NULL,
    user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    delta_seq INTEGER NOT NULL,
    PRIMARY KEY (room_id, seq, emoji, user_id)
) STRICT, WITHOUT ROWID;
