-- The push-notification path and durable last seen. Keep in step with
-- ../postgres/V14__notify_last_seen.sql.

-- Who a message mentions, by message: the push path asks it once per committed post when a gateway
-- is configured (chime_storage::SharedStore::push_targets); the primary key is by user first.
CREATE INDEX mentions_message ON mentions (room_id, seq);

-- When the user's last connection closed (Unix ms); NULL: never seen, or online since the column
-- came. Written once per user going offline, never per message or keystroke.
ALTER TABLE users ADD COLUMN last_seen_at INTEGER;
