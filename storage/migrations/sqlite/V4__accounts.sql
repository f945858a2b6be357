-- Accounts: an email and a display name per user, and the settings the server keeps for a user
-- and syncs to every device. Keep in step with ../postgres/V4__accounts.sql.

-- `email` is kept as the user typed it; `email_key` is its lower-cased form, computed by the store
-- in Rust (chime_storage::email_key) rather than with SQL's lower(), which folds only ASCII here
-- and all of Unicode in PostgreSQL: both stores must agree on which addresses are the same. NULLs
-- never collide, so any number of users may have no email. `display_name` NULL: never chosen (the
-- user name is shown). `settings_version` counts the user's setting changes, so a device can tell
-- a newer state from an older one whatever order they reach it in.
ALTER TABLE users ADD COLUMN email TEXT;
ALTER TABLE users ADD COLUMN email_key TEXT;
ALTER TABLE users ADD COLUMN display_name TEXT;
ALTER TABLE users ADD COLUMN settings_version INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX users_email_key ON users (email_key);

-- The member's notification level for the room: 0 all, 1 mentions only, 2 none. It lives on the
-- membership row because that is what a posted mention is fanned out over: deciding whom to notify
-- reads it per (room, user) with the row it already needs. Leaving the room drops it with the row.
-- The partial index serves the settings listing, which names only the rooms not at the default.
ALTER TABLE room_members ADD COLUMN notify INTEGER NOT NULL DEFAULT 0 CHECK (notify IN (0, 1, 2));
CREATE INDEX room_members_notify ON room_members (user_id, room_id) WHERE notify <> 0;

-- Account-wide settings (media preferences, and whatever comes later) as key/value rows: the
-- daemon knows the keys, checks the values and fills in the defaults, so a new setting needs no
-- migration and a default can change without rewriting rows. Only settings a user set have a row.
CREATE TABLE user_settings (
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key     TEXT    NOT NULL,
    value   TEXT    NOT NULL,
    PRIMARY KEY (user_id, key)
) STRICT, WITHOUT ROWID;
