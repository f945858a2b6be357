-- Direct dialogs: exactly one room per pair of users, whichever side asks first. The pair is
-- stored with the smaller user id first, so (a, b) and (b, a) are the same key. Keep in step with
-- ../sqlite/V6__direct.sql.
CREATE TABLE direct_rooms (
    user_lo BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    user_hi BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    room_id BIGINT NOT NULL UNIQUE REFERENCES rooms (id) ON DELETE CASCADE,
    PRIMARY KEY (user_lo, user_hi),
    CHECK (user_lo < user_hi)
);
