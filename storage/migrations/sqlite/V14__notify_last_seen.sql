-- The push-notification path and durable last seen. Keep in step with
-- ../postgres/V14__notify_last_seen.sql.

-- Who a message mentions, by message: the push path asks it once per committed post when a gateway
-- is configured (chime_storage::SharedStore::push_targets); the primary key is by user first.
CREATE INDEX mentions_message ON mentions (room_id, seq);

-- Durable "last seen" needs no column: a session's last_used_at is written when its connection
-- closes (batched, chimed's touch_sessions), so a user's last seen is the latest of their
-- sessions'; this index makes that one range per user.
CREATE INDEX sessions_user_last_used ON sessions (user_id, last_used_at);
