-- Full-text search over messages' current text (chime_storage::search). Keep in step with
-- ../sqlite/V9__search.sql.
--
-- One row per indexed message: its words as a tsvector built by the store from its own splitter
-- (array_to_tsvector: no parser, no dictionary, so exactly the words SQLite indexes), under a GIN
-- index. Partitioned by hash of room_id like deltas, so a search is pruned to one partition's
-- index; within it the planner either intersects the words' GIN lists (rare words) or walks the
-- room's newest seqs backwards checking each (common words).
CREATE TABLE message_search (
    room_id BIGINT   NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq     BIGINT   NOT NULL,
    words   TSVECTOR NOT NULL,
    PRIMARY KEY (room_id, seq)
) PARTITION BY HASH (room_id);

DO $$
BEGIN
    FOR i IN 0..15 LOOP
        EXECUTE format('CREATE TABLE message_search_%s PARTITION OF message_search FOR VALUES WITH (MODULUS 16, REMAINDER %s)',
                       lpad(i::text, 2, '0'), i);
    END LOOP;
END
$$;

CREATE INDEX message_search_words ON message_search USING gin (words);

-- Messages written before this migration, in their current state: not deleted, edited ones by
-- their latest text, none of a secret room (kind 2). Split here by the database's regular
-- expressions and lower(), which match the store's splitter for ASCII text.
INSERT INTO message_search (room_id, seq, words)
SELECT m.room_id, m.seq, array_to_tsvector(m.words)
FROM (
    SELECT d.room_id, d.seq,
           ARRAY(SELECT w FROM regexp_split_to_table(lower(coalesce(s.text, d.body)), '[^[:alnum:]]+') AS w
                 WHERE w <> '' AND octet_length(w) <= 100) AS words
    FROM deltas d
    JOIN rooms r ON r.id = d.room_id
    LEFT JOIN message_state s ON s.room_id = d.room_id AND s.seq = d.seq
    WHERE d.kind IN (2, 9) AND s.deleted_seq IS NULL AND r.kind <> 2
) m
WHERE cardinality(m.words) > 0;

ANALYZE message_search;
