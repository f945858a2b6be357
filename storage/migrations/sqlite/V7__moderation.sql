-- Moderation and roles. Keep in step with ../postgres/V7__moderation.sql.

-- Muted by a moderator: may read, may not post. (`muted` is the member's own choice to mute the
-- room's notifications; this is the room's decision.)
ALTER TABLE room_members ADD COLUMN silenced INTEGER NOT NULL DEFAULT 0;

-- Users kept out of a room until unbanned.
CREATE TABLE room_bans (
    room_id   INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    banned_by INTEGER NOT NULL REFERENCES users (id),
    banned_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
) STRICT, WITHOUT ROWID;

-- A room's own roles: named roles, and `member` when the room redefines what every plain member
-- may do. `perms` is chime_protocol::Permissions' bit mask.
CREATE TABLE room_roles (
    room_id INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    name    TEXT    NOT NULL,
    perms   INTEGER NOT NULL,
    PRIMARY KEY (room_id, name)
) STRICT, WITHOUT ROWID;
