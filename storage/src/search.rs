//! Full-text search in a room: the one word splitter both stores index and query with, and the
//! rules for what is indexed.
//!
//! A message's words are its runs of letters, marks, digits and private-use characters (Unicode
//! general categories L, M, N and Co), lower-cased; everything else (spaces, punctuation,
//! symbols, emoji) separates words, and words over [`MAX_WORD_BYTES`] are not indexed. A query is
//! plain words split the same way, all of which a message must contain: there is no search
//! syntax, so nothing a user types can reach the database's query language. No stemming and no
//! accent folding: chat mixes languages, and the two stores' stemmers (PostgreSQL's Snowball,
//! SQLite's Porter) would find different messages for the same words.
//!
//! PostgreSQL indexes exactly the words computed here (`array_to_tsvector`, no parser); SQLite's
//! FTS5 tokenizer is configured with the same categories (`unicode61 categories 'L* N* M* Co'`)
//! and is fed the lower-cased words, so both stores split alike. Each store keeps its index in
//! step with the messages in the transaction that changes them: a message or reply is indexed
//! when posted, an edit replaces its words, a delete removes them, so a deleted message is never
//! found and an edited one only by its latest text.
//!
//! What is not indexed at all: rooms for which [`indexable`] says no (secret rooms, whose
//! messages the server must not be able to search), and on SQLite messages whose room id or seq
//! falls outside [`doc_id`]'s range.

use crate::{RoomId, RoomKind, Seq};
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// Longest word indexed or searched for, in bytes (after lower-casing). Longer runs are not
/// words people search for (hashes, base64), and PostgreSQL refuses lexemes past 2 KiB.
pub const MAX_WORD_BYTES: usize = 100;
/// Most words in one query.
pub const MAX_QUERY_WORDS: usize = 16;
/// Longest query, in bytes.
pub const MAX_QUERY_BYTES: usize = 1024;

/// Whether messages of a room of this kind are indexed for search: not in secret rooms, whose
/// text must never reach an index (the index would keep words of a message after its key is
/// destroyed; see [`crate::secret`]). Every index write goes through this.
pub fn indexable(kind: RoomKind) -> bool {
    kind != RoomKind::SECRET
}

fn is_word_char(c: char) -> bool {
    matches!(
        c.general_category_group(),
        GeneralCategoryGroup::Letter | GeneralCategoryGroup::Mark | GeneralCategoryGroup::Number
    ) || c.general_category() == GeneralCategory::PrivateUse
}

/// A text's words, in order, repeats kept: lower-cased first, then split, so a letter whose
/// lower case is several characters stays in one word.
pub fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !is_word_char(c))
        .filter(|w| !w.is_empty() && w.len() <= MAX_WORD_BYTES)
        .map(str::to_string)
        .collect()
}

/// What a store indexes for a text: its words joined by single spaces (empty when it has none,
/// and then nothing is indexed).
pub fn index_text(text: &str) -> String {
    words(text).join(" ")
}

/// The words of a query, sorted and without repeats; a message matches when it has all of them.
/// The error says what is wrong, for a person: too long, no words, too many, a word too long.
pub fn parse_query(query: &str) -> Result<Vec<String>, String> {
    if query.len() > MAX_QUERY_BYTES {
        return Err(format!("a search is at most {MAX_QUERY_BYTES} bytes"));
    }
    let lower = query.to_lowercase();
    let mut found: Vec<String> =
        lower.split(|c: char| !is_word_char(c)).filter(|w| !w.is_empty()).map(String::from).collect();
    if let Some(long) = found.iter().find(|w| w.len() > MAX_WORD_BYTES) {
        return Err(format!("a search word is at most {MAX_WORD_BYTES} bytes ({} given)", long.len()));
    }
    found.sort_unstable();
    found.dedup();
    match found.len() {
        0 => Err("a search needs at least one word (letters or digits)".into()),
        n if n > MAX_QUERY_WORDS => Err(format!("a search has at most {MAX_QUERY_WORDS} words ({n} given)")),
        _ => Ok(found),
    }
}

/// The integer a message is known by in SQLite's full-text index (FTS5 keys documents by one
/// integer, and `deltas` has no rowid): the room id in the high 31 bits and the seq in the low
/// 32, so one room's messages are one contiguous, seq-ordered range of keys, and a search in a
/// room is a range scan of each word's document list. `None` (not indexed) for room ids from 2^31
/// and seqs from 2^32.
pub fn doc_id(room: RoomId, seq: Seq) -> Option<i64> {
    let (room, seq) = (room.get(), seq.get());
    if room >= 1 << 31 || seq >= 1 << 32 {
        return None;
    }
    i64::try_from(room << 32 | seq).ok()
}

/// An FTS5 query that matches documents with every word: each word a quoted string (an inner
/// quote doubled), side by side, which FTS5 reads as AND. Words from [`parse_query`] hold no
/// quotes, but the quoting is what keeps any input from being read as FTS5 syntax.
pub(crate) fn fts5_query(words: &[String]) -> String {
    words.iter().map(|w| format!("\"{}\"", w.replace('"', "\"\""))).collect::<Vec<_>>().join(" ")
}

/// A PostgreSQL `tsquery` that matches documents with every word: each a quoted lexeme (inner
/// quotes and backslashes escaped), joined by `&`. Cast from text, it is taken as is, with no
/// parser or dictionary in between, like the words indexed.
pub(crate) fn tsquery(words: &[String]) -> String {
    words.iter().map(|w| format!("'{}'", w.replace('\\', "\\\\").replace('\'', "''"))).collect::<Vec<_>>().join(" & ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_runs_of_letters_and_digits_lower_cased() {
        assert_eq!(words("Hello, WORLD! it's 2026"), ["hello", "world", "it", "s", "2026"]);
        assert_eq!(words("naïve café"), ["naïve", "café"], "accents stay");
        assert_eq!(words("👍 ... -- "), Vec::<String>::new());
        assert_eq!(words("日本語のテキスト"), ["日本語のテキスト"], "no word breaks without separators");
        // İ lower-cases to i and a combining dot: one word still.
        assert_eq!(words("İstanbul"), ["i\u{307}stanbul"]);
        let long = "x".repeat(MAX_WORD_BYTES + 1);
        assert_eq!(words(&format!("a {long} b")), ["a", "b"]);
        assert_eq!(index_text(" Hi  there "), "hi there");
    }

    #[test]
    fn queries_are_plain_words() {
        assert_eq!(parse_query("Cat dog cat"), Ok(vec!["cat".to_string(), "dog".into()]));
        assert_eq!(
            parse_query("\"x\" OR y* NEAR(z)"),
            Ok(vec!["near".into(), "or".into(), "x".into(), "y".into(), "z".into()])
        );
        assert!(parse_query("!!!").is_err());
        assert!(parse_query(&"w ".repeat(MAX_QUERY_WORDS + 1)).is_ok(), "repeats count once");
        let many: String = (0..=MAX_QUERY_WORDS).map(|i| format!("w{i} ")).collect();
        assert!(parse_query(&many).is_err());
        assert!(parse_query(&"x".repeat(MAX_WORD_BYTES + 1)).is_err());
        assert!(parse_query(&"a ".repeat(MAX_QUERY_BYTES)).is_err());
    }

    #[test]
    fn database_queries_quote_every_word() {
        let words = vec!["a\"b".to_string(), "c'd\\".into()];
        assert_eq!(fts5_query(&words), "\"a\"\"b\" \"c'd\\\"");
        assert_eq!(tsquery(&words), "'a\"b' & 'c''d\\\\'");
    }

    #[test]
    fn doc_ids_keep_rooms_apart_and_in_seq_order() {
        assert_eq!(doc_id(RoomId(1), Seq(5)), Some((1 << 32) + 5));
        assert!(doc_id(RoomId(1), Seq(6)) > doc_id(RoomId(1), Seq(5)));
        assert!(doc_id(RoomId(2), Seq(1)) > doc_id(RoomId(1), Seq((1 << 32) - 1)));
        assert_eq!(doc_id(RoomId(1 << 31), Seq(1)), None);
        assert_eq!(doc_id(RoomId(1), Seq(1 << 32)), None);
        assert_eq!(doc_id(RoomId((1 << 31) - 1), Seq((1 << 32) - 1)), Some(i64::MAX));
    }
}
