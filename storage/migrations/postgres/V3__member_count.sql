-- Each room's member count, kept by a trigger as memberships come and go, so that asking how many
-- members a room has (GET_ROOM) reads one row instead of counting them; a room of a million
-- members must not cost a million rows per question. Keep in step with ../sqlite/V3__member_count.sql.
-- Every membership change already holds the room's row lock (its delta bumps last_seq first), so
-- the update adds no new lock order.
ALTER TABLE rooms ADD COLUMN member_count BIGINT NOT NULL DEFAULT 0;
UPDATE rooms SET member_count = (SELECT count(*) FROM room_members m WHERE m.room_id = rooms.id);

CREATE FUNCTION room_members_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE rooms SET member_count = member_count + 1 WHERE id = NEW.room_id;
        RETURN NEW;
    END IF;
    UPDATE rooms SET member_count = member_count - 1 WHERE id = OLD.room_id;
    RETURN OLD;
END
$$;

CREATE TRIGGER room_members_count AFTER INSERT OR DELETE ON room_members
    FOR EACH ROW EXECUTE FUNCTION room_members_count();
