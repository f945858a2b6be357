-- Servers (communities) and their channels. Keep in step with ../sqlite/V10__servers.sql, which
-- says why channels have no room_members rows.

CREATE TABLE servers (
    id           BIGSERIAL PRIMARY KEY,
    name         TEXT    NOT NULL,
    description  TEXT    NOT NULL DEFAULT '',
    public       BOOLEAN NOT NULL,
    owner_id     BIGINT  NOT NULL REFERENCES users (id),
    member_cap   BIGINT  NOT NULL,
    member_count BIGINT  NOT NULL DEFAULT 0,
    created_at   BIGINT  NOT NULL
);

CREATE TABLE server_members (
    server_id BIGINT  NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    user_id   BIGINT  NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      TEXT    NOT NULL,
    silenced  BOOLEAN NOT NULL DEFAULT FALSE,
    joined_at BIGINT  NOT NULL,
    PRIMARY KEY (server_id, user_id)
);
CREATE INDEX server_members_user ON server_members (user_id);

CREATE FUNCTION server_member_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE servers SET member_count = member_count + 1 WHERE id = NEW.server_id;
    ELSE
        UPDATE servers SET member_count = member_count - 1 WHERE id = OLD.server_id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER server_members_counted AFTER INSERT OR DELETE ON server_members
    FOR EACH ROW EXECUTE FUNCTION server_member_count();

CREATE TABLE server_roles (
    server_id BIGINT NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    name      TEXT   NOT NULL,
    perms     BIGINT NOT NULL,
    PRIMARY KEY (server_id, name)
);

ALTER TABLE rooms ADD COLUMN server_id BIGINT REFERENCES servers (id) ON DELETE CASCADE;
ALTER TABLE rooms ADD COLUMN read_roles TEXT;
ALTER TABLE rooms ADD COLUMN post_roles TEXT;
CREATE INDEX rooms_server ON rooms (server_id) WHERE server_id IS NOT NULL;

CREATE VIEW room_access AS
    SELECT m.room_id, m.user_id, m.role, m.silenced, rr.perms AS defined, NULL::text AS post_roles
    FROM room_members m
    LEFT JOIN room_roles rr ON rr.room_id = m.room_id AND rr.name = m.role
    UNION ALL
    SELECT r.id, sm.user_id, sm.role, sm.silenced, sr.perms, r.post_roles
    FROM rooms r
    JOIN server_members sm ON sm.server_id = r.server_id
    LEFT JOIN server_roles sr ON sr.server_id = sm.server_id AND sr.name = sm.role
    WHERE r.read_roles IS NULL OR sm.role IN ('owner', 'admin')
       OR position(',' || sm.role || ',' IN ',' || r.read_roles || ',') > 0;
