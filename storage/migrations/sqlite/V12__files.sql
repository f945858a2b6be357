-- Files shared in rooms. Keep in step with ../postgres/V12__files.sql.

-- Content addressed by SHA-256, with the number of file records that point at it. The bytes are
-- the daemon's content store's; a row at zero references is collected by the daemon under its
-- per-content lock (the row is removed only if it is still at zero).
CREATE TABLE contents (
    sha256     BLOB    NOT NULL PRIMARY KEY,
    size       INTEGER NOT NULL,
    refs       INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX contents_unreferenced ON contents (sha256) WHERE refs <= 0;

-- One record per shared copy (an upload, or a forward of one): the FILE of the design. It
-- belongs to the FILE_SHARED delta (room_id, seq) that shared it, and goes when that is deleted.
CREATE TABLE files (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_id      INTEGER NOT NULL REFERENCES users (id),
    name          TEXT    NOT NULL,
    internal_name TEXT    NOT NULL,
    uploaded_at   INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    sha256        BLOB    NOT NULL REFERENCES contents (sha256),
    media_type    TEXT    NOT NULL,
    room_id       INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    UNIQUE (room_id, seq)
) STRICT;

-- FILE PERMISSIONS: the rooms whose readers may download a file record.
CREATE TABLE file_permissions (
    file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    room_id INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    PRIMARY KEY (file_id, room_id)
) STRICT, WITHOUT ROWID;

-- Upload sessions, durable so that a resume works from another connection and after a restart.
-- How many bytes are stored is what the staging file holds, not a column.
CREATE TABLE uploads (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    room_id    INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    media_type TEXT    NOT NULL,
    sha256     BLOB    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
