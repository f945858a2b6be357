-- Files shared in rooms. Keep in step with ../sqlite/V12__files.sql (comments there).

CREATE TABLE contents (
    sha256     BYTEA  NOT NULL PRIMARY KEY,
    size       BIGINT NOT NULL,
    refs       BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX contents_unreferenced ON contents (sha256) WHERE refs <= 0;

CREATE TABLE files (
    id            BIGSERIAL PRIMARY KEY,
    owner_id      BIGINT NOT NULL REFERENCES users (id),
    name          TEXT   NOT NULL,
    internal_name TEXT   NOT NULL,
    uploaded_at   BIGINT NOT NULL,
    size          BIGINT NOT NULL,
    sha256        BYTEA  NOT NULL REFERENCES contents (sha256),
    media_type    TEXT   NOT NULL,
    room_id       BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq           BIGINT NOT NULL,
    UNIQUE (room_id, seq)
);

CREATE TABLE file_permissions (
    file_id BIGINT NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    room_id BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    PRIMARY KEY (file_id, room_id)
);

CREATE TABLE uploads (
    id         BIGSERIAL PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    room_id    BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    name       TEXT   NOT NULL,
    size       BIGINT NOT NULL,
    media_type TEXT   NOT NULL,
    sha256     BYTEA  NOT NULL,
    created_at BIGINT NOT NULL
);
