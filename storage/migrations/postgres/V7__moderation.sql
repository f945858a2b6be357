-- Moderation and roles. Keep in step with ../sqlite/V7__moderation.sql.

ALTER TABLE room_members ADD COLUMN silenced BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TABLE room_bans (
    room_id   BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id   BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    banned_by BIGINT NOT NULL REFERENCES users (id),
    banned_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

CREATE TABLE room_roles (
    room_id BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    name    TEXT   NOT NULL,
    perms   BIGINT NOT NULL,
    PRIMARY KEY (room_id, name)
);
