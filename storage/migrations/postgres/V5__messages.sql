-- Messages' current state, kept beside the immutable log: edits, deletes, reactions, pins and
-- replies are deltas (so SYNC and RESTORE carry them), and these tables hold what they add up
-- to, so that reading a message's state never replays its log and counting its reactions never
-- counts rows. Keep in step with ../sqlite/V5__messages.sql.

ALTER TABLE deltas ADD COLUMN target BIGINT;

CREATE TABLE message_state (
    room_id     BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    text        TEXT,
    edited_at   BIGINT,
    deleted_seq BIGINT,
    pinned_seq  BIGINT,
    PRIMARY KEY (room_id, seq)
);

CREATE TABLE reactions (
    room_id BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq     BIGINT NOT NULL,
    emoji   TEXT   NOT NULL,
    count   BIGINT NOT NULL CHECK (count > 0),
    PRIMARY KEY (room_id, seq, emoji)
);

CREATE TABLE reaction_users (
    room_id   BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq       BIGINT NOT NULL,
    emoji     TEXT   NOT NULL,
    user_id   BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    delta_seq BIGINT NOT NULL,
    PRIMARY KEY (room_id, seq, emoji, user_id)
);
