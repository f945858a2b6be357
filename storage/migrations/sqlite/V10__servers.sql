-- Servers (communities) and their channels. Keep in step with ../postgres/V10__servers.sql.
--
-- A channel is a room with a server_id. Nobody is a row of room_members in a channel: access
-- comes from server_members and the member's server role, so a server of a million members
-- costs a million rows once (its members), not once per channel, and posting, reading or joining
-- touches one or two rows whatever the server's size.

CREATE TABLE servers (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    description  TEXT    NOT NULL DEFAULT '',
    public       INTEGER NOT NULL,
    owner_id     INTEGER NOT NULL REFERENCES users (id),
    member_cap   INTEGER NOT NULL,
    member_count INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL
) STRICT;

CREATE TABLE server_members (
    server_id INTEGER NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      TEXT    NOT NULL,
    silenced  INTEGER NOT NULL DEFAULT 0,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (server_id, user_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX server_members_user ON server_members (user_id);

-- Counted by triggers, as room members are: asking a server's size reads one row.
CREATE TRIGGER server_members_added AFTER INSERT ON server_members
BEGIN
    UPDATE servers SET member_count = member_count + 1 WHERE id = NEW.server_id;
END;
CREATE TRIGGER server_members_removed AFTER DELETE ON server_members
BEGIN
    UPDATE servers SET member_count = member_count - 1 WHERE id = OLD.server_id;
END;

CREATE TABLE server_roles (
    server_id INTEGER NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    name      TEXT    NOT NULL,
    perms     INTEGER NOT NULL,
    PRIMARY KEY (server_id, name)
) STRICT, WITHOUT ROWID;

ALTER TABLE rooms ADD COLUMN server_id INTEGER REFERENCES servers (id) ON DELETE CASCADE;
-- Comma-separated roles that may read / post in a channel; NULL: every member of the server.
-- Owners and admins always may.
ALTER TABLE rooms ADD COLUMN read_roles TEXT;
ALTER TABLE rooms ADD COLUMN post_roles TEXT;
CREATE INDEX rooms_server ON rooms (server_id) WHERE server_id IS NOT NULL;

-- Who may read a room, with what role: its own members, and for a channel the members of its
-- server whose role may read it. Queried with room_id and user_id (or a user_id range) bound, so
-- each arm is a primary-key lookup.
CREATE VIEW room_access AS
    SELECT m.room_id, m.user_id, m.role, m.silenced, rr.perms AS defined, NULL AS post_roles
    FROM room_members m
    LEFT JOIN room_roles rr ON rr.room_id = m.room_id AND rr.name = m.role
    UNION ALL
    SELECT r.id, sm.user_id, sm.role, sm.silenced, sr.perms, r.post_roles
    FROM rooms r
    JOIN server_members sm ON sm.server_id = r.server_id
    LEFT JOIN server_roles sr ON sr.server_id = sm.server_id AND sr.name = sm.role
    WHERE r.read_roles IS NULL OR sm.role IN ('owner', 'admin')
       OR instr(',' || r.read_roles || ',', ',' || sm.role || ',') > 0;
