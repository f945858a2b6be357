-- Chime's initial schema for PostgreSQL. Times are Unix milliseconds.
-- Keep in step with ../sqlite/V1__initial.sql: both stores must behave the same.

CREATE TABLE users (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT   NOT NULL UNIQUE,
    password_hash TEXT   NOT NULL,
    created_at    BIGINT NOT NULL
);

-- Only the SHA-256 of a session token is stored, so a copy of the database logs nobody in.
CREATE TABLE sessions (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash   BYTEA  NOT NULL UNIQUE,
    ip           TEXT   NOT NULL,
    user_agent   TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX sessions_user ON sessions (user_id);

-- last_seq is the room's head: seqs are handed out from it in the transaction that writes the
-- delta (holding the row lock), so the log has no gaps.
CREATE TABLE rooms (
    id         BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT     NOT NULL,
    kind       SMALLINT NOT NULL,
    last_seq   BIGINT   NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    roles_json TEXT     NOT NULL DEFAULT '{}',
    created_by BIGINT   NOT NULL REFERENCES users (id),
    created_at BIGINT   NOT NULL
);

-- Membership in its own table, keyed by room, so large rooms page their members cheaply.
CREATE TABLE room_members (
    room_id   BIGINT  NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id   BIGINT  NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      TEXT    NOT NULL,
    muted     BOOLEAN NOT NULL DEFAULT FALSE,
    joined_at BIGINT  NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_user ON room_members (user_id);

-- The per-room log; the primary key makes "deltas of a room after seq N" one index range scan.
-- A NULL idempotency key (JOIN, LEAVE, ...) never collides.
CREATE TABLE deltas (
    room_id         BIGINT   NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq             BIGINT   NOT NULL CHECK (seq > 0),
    kind            SMALLINT NOT NULL,
    author_id       BIGINT   NOT NULL REFERENCES users (id),
    body            TEXT     NOT NULL,
    created_at      BIGINT   NOT NULL,
    idempotency_key TEXT,
    PRIMARY KEY (room_id, seq),
    CONSTRAINT deltas_idempotency UNIQUE (room_id, author_id, idempotency_key)
);
