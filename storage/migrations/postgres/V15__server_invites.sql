-- Invitations to servers and server bans. Keep in step with ../sqlite/V15__server_invites.sql.

-- A user invited to a server by a member who may invite: a private server's only way in. Used up
-- by the JOIN_SERVER it allows; dropped by a ban.
CREATE TABLE server_invites (
    server_id  BIGINT NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    user_id    BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    invited_by BIGINT NOT NULL REFERENCES users (id),
    invited_at BIGINT NOT NULL,
    PRIMARY KEY (server_id, user_id)
);

-- Users kept out of a server (public or private) until unbanned.
CREATE TABLE server_bans (
    server_id BIGINT NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    user_id   BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    banned_by BIGINT NOT NULL REFERENCES users (id),
    banned_at BIGINT NOT NULL,
    PRIMARY KEY (server_id, user_id)
);
