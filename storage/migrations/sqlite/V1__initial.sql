-- Chime's initial schema for the embedded store. Times are Unix milliseconds.
-- Keep in step with ../postgres/V1__initial.sql: both stores must behave the same.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    created_at    INTEGER NOT NULL
) STRICT;

-- Only the SHA-256 of a session token is stored, so a copy of the database logs nobody in.
CREATE TABLE sessions (
    id           INTEGER PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash   BLOB    NOT NULL UNIQUE,
    ip           TEXT    NOT NULL,
    user_agent   TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL,
    revoked_at   INTEGER
) STRICT;
CREATE INDEX sessions_user ON sessions (user_id);

-- last_seq is the room's head: seqs are handed out from it in the transaction that writes the
-- delta, so the log has no gaps.
CREATE TABLE rooms (
    id         INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    kind       INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    roles_json TEXT    NOT NULL DEFAULT '{}',
    created_by INTEGER NOT NULL REFERENCES users (id),
    created_at INTEGER NOT NULL
) STRICT;

-- Membership in its own table, keyed by room, so large rooms page their members cheaply.
CREATE TABLE room_members (
    room_id   INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      TEXT    NOT NULL,
    muted     INTEGER NOT NULL DEFAULT 0,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX room_members_user ON room_members (user_id);

-- The per-room log. WITHOUT ROWID clusters rows by (room_id, seq), so "deltas of a room after
-- seq N" is one range scan. A NULL idempotency key (JOIN, LEAVE, ...) never collides.
CREATE TABLE deltas (
    room_id         INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL CHECK (seq > 0),
    kind            INTEGER NOT NULL,
    author_id       INTEGER NOT NULL REFERENCES users (id),
    body            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    idempotency_key TEXT,
    PRIMARY KEY (room_id, seq),
    UNIQUE (room_id, author_id, idempotency_key)
) STRICT, WITHOUT ROWID;
