-- Each room's member count, kept by triggers as memberships come and go, so that asking how many
-- members a room has (GET_ROOM) reads one row instead of counting them; a room of a million
-- members must not cost a million rows per question. Keep in step with ../postgres/V3__member_count.sql.
ALTER TABLE rooms ADD COLUMN member_count INTEGER NOT NULL DEFAULT 0;
UPDATE rooms SET member_count = (SELECT count(*) FROM room_members m WHERE m.room_id = rooms.id);

CREATE TRIGGER room_members_added AFTER INSERT ON room_members
BEGIN
    UPDATE rooms SET member_count = member_count + 1 WHERE id = NEW.room_id;
END;

CREATE TRIGGER room_members_removed AFTER DELETE ON room_members
BEGIN
    UPDATE rooms SET member_count = member_count - 1 WHERE id = OLD.room_id;
END;
