-- Full-text search over messages' current text (chime_storage::search). Contentless: the text
-- stays in deltas and message_state, the index holds only words, keyed by doc_id = room_id * 2^32
-- + seq so that one room is one range of keys; contentless_delete lets an edit or a delete
-- remove a document by its key alone. The tokenizer's categories are the ones the store splits
-- words by. Keep in step with ../postgres/V9__search.sql.
CREATE VIRTUAL TABLE message_search USING fts5 (
    words,
    content = '',
    contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 0 categories ''L* N* M* Co'''
);

-- Messages written before this migration, in their current state: not deleted, edited ones by
-- their latest text, none of a secret room (kind 2). FTS5 lower-cases and splits them itself,
-- which matches the store's splitter for all but a few exotic letters.
INSERT INTO message_search (rowid, words)
SELECT d.room_id * 4294967296 + d.seq, coalesce(s.text, d.body)
FROM deltas d
JOIN rooms r ON r.id = d.room_id
LEFT JOIN message_state s ON s.room_id = d.room_id AND s.seq = d.seq
WHERE d.kind IN (2, 9) AND s.deleted_seq IS NULL AND r.kind <> 2
  AND d.room_id < 2147483648 AND d.seq < 4294967296;
