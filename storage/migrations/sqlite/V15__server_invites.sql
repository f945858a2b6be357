-- Invitations to servers and server bans. Keep in step with ../postgres/V15__server_invites.sql.

-- A user invited to a server by a member who may invite: a private server's only way in. Used up
-- by the JOIN_SERVER it allows; dropped by a ban.
CREATE TABLE server_invites (
    server_id  INTEGER NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    invited_by INTEGER NOT NULL REFERENCES users (id),
    invited_at INTEGER NOT NULL,
    PRIMARY KEY (server_id, user_id)
) STRICT, WITHOUT ROWID;

-- Users kept out of a server (public or private) until unbanned.
CREATE TABLE server_bans (
    server_id INTEGER NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    banned_by INTEGER NOT NULL REFERENCES users (id),
    banned_at INTEGER NOT NULL,
    PRIMARY KEY (server_id, user_id)
) STRICT, WITHOUT ROWID;
