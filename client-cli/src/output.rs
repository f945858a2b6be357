//! Everything `chime` prints on stdout: JSON objects for `--json`, readable lines otherwise.
//!
//! Each record is one line, written and flushed at once, so `tail` output reaches a pipe as it
//! happens and a reader never sees half a line. Delta timestamps are RFC 3339 in UTC with
//! milliseconds.
//!
//! # What the terminal is allowed to see
//!
//! Human output carries text other users chose (messages, user names, room names, the server's
//! own words). [`escape_for_terminal`] replaces every character that is not shown as itself with
//! a visible Rust-style escape (`\u{202e}`, `\n`), so a message can neither drive the terminal nor
//! hide or reorder the text around it. [`Output::record`] escapes each human line as a whole, so
//! no command can print a server string raw by forgetting to; `main` does the same for the error
//! line and log lines on stderr. Our own wording contains none of these characters, and an escape
//! is plain ASCII, so escaping twice changes nothing. `--json` stays exact: serde_json escapes what
//! JSON requires and the consumer decides the rest.
//!
//! Escaped, by Unicode general category:
//! - `Cc` controls: escape sequences, carriage returns, newlines (which would break the
//!   one-line-per-record rule), C1 controls.
//! - `Cf` format characters: bidi overrides, embeddings, isolates and marks (U+202A..U+202E,
//!   U+2066..U+2069, U+200E/U+200F, U+061C), zero-width spaces and joiners (U+200B..U+200D,
//!   U+2060..U+2064, U+FEFF), the soft hyphen U+00AD, interlinear annotations (U+FFF9..U+FFFB) and
//!   tag characters (U+E0000..), which can hide text or make two different strings look alike.
//!   The cost: text that uses them legitimately shows the escape, e.g. the ZWNJ inside Persian
//!   words or an RLM in mixed Hebrew and English; the characters are still there in `--json`.
//! - `Zl`, `Zp`: U+2028 and U+2029 are line and paragraph breaks to Unicode; a terminal, pager or
//!   editor may break the line there (breaking the one-line-per-record rule) or show nothing.
//! - `Co` private use: what it shows is a private agreement of the reader's font, not of the
//!   writer's text.
//! - `Cn` unassigned and noncharacters: a later Unicode version may make one a format character
//!   that the terminal honours before our table knows it; escaping what the table cannot vouch
//!   for keeps the rule safe across versions (a brand-new emoji shows escaped until then).
//!
//! One exception: U+200D ZERO WIDTH JOINER is printed as is between two emoji (after an optional
//! U+FE0F or skin-tone modifier), so emoji ZWJ sequences such as 👩🏽‍💻 or 🏳️‍🌈 render as one
//! glyph. There it only joins pictures; it cannot reorder anything, and ASCII keycap bases (`0`-`9`,
//! `#`, `*` are `Emoji=Yes`) do not count, so `bob1` and `bob\u{200d}1` still look different.
//! Everywhere else, including between letters, it is escaped. Emoji tag sequences (subdivision
//! flags) show their tag characters escaped.
//!
//! Not escaped: letters, marks (`Mn`, which include variation selectors) and spaces (`Zs`). They
//! are part of ordinary writing in many scripts, they cannot move the cursor or the text
//! direction, and singling out look-alikes among them would take a hand-kept list. Ordinary
//! right-to-left text (Arabic, Hebrew) is printed as is for the terminal's own bidi handling. A
//! backslash is not escaped either, so someone may type a literal `\u{202e}`; `--json` tells the two
//! apart.
//!
//! The category table comes from `unicode-properties` (unicode-rs, the maintainers of
//! `unicode-normalization` and `unicode-width`): tracking Unicode versions is not our business, the
//! crate follows the latest one (Unicode 18 in 0.1.5), it has no dependencies, and it was already in our dependency tree
//! (through `postgres`' `stringprep`), so it adds no new code to audit. `unicode-general-category`
//! (yeslogic) would do as well but lags a Unicode version behind and would be one more crate.

use chime_protocol::{Delta, DeltaKind, MessageView, RoomId};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{self, Write};
use time::macros::format_description;
use time::OffsetDateTime;
use unicode_properties::{GeneralCategory, UnicodeEmoji, UnicodeGeneralCategory};

/// Where records go and in which form.
pub struct Output<W: Write> {
    /// Whether to print JSON (`--json`).
    json: bool,
    /// The sink, stdout outside tests.
    out: W,
}

impl Output<io::Stdout> {
    /// Output to stdout.
    pub fn stdout(json: bool) -> Self {
        Output::new(json, io::stdout())
    }
}

impl<W: Write> Output<W> {
    /// Output to any writer.
    pub fn new(json: bool, out: W) -> Self {
        Output { json, out }
    }

    /// Prints one record: `json` as a single line with `--json`, else `human` with everything the
    /// terminal would not show as text escaped (see the module doc).
    pub fn record(&mut self, json: &Value, human: &str) -> io::Result<()> {
        if self.json {
            // Serializing a `Value` to a writer only fails on an I/O error.
            serde_json::to_writer(&mut self.out, json).map_err(io::Error::from)?;
            self.out.write_all(b"\n")?;
        } else {
            writeln!(self.out, "{}", escape_for_terminal(human))?;
        }
        self.out.flush()
    }

    /// Prints one delta.
    pub fn delta(&mut self, delta: &Delta) -> io::Result<()> {
        self.record(&delta_json(delta), &delta_human(delta))
    }

    /// Prints one message in its current state (`view`).
    pub fn message(&mut self, room: RoomId, m: &MessageView) -> io::Result<()> {
        self.record(&message_json(room, m), &message_human(room, m))
    }

    /// The writer, for tests.
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A delta as its JSON object.
pub fn delta_json(delta: &Delta) -> Value {
    if let chime_protocol::DeltaBody::FileShared(f) = &delta.body {
        return json!({
            "room": delta.room.get(),
            "seq": delta.seq.get(),
            "kind": "file",
            "author": delta.author,
            "author_id": delta.author_id.get(),
            "ts": rfc3339_ms(delta.ts_ms),
            "text": f.caption,
            "file": f.file,
            "name": f.name,
            "size": f.size,
            "media_type": f.media_type,
            "sha256": hex::encode(f.sha256),
        });
    }
    #[derive(Serialize)]
    struct DeltaJson<'a> {
        room: u64,
        seq: u64,
        kind: String,
        author: &'a str,
        author_id: u64,
        ts: String,
        text: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<u64>,
    }
    let record = DeltaJson {
        room: delta.room.get(),
        seq: delta.seq.get(),
        kind: delta.kind().json_name(),
        author: &delta.author,
        author_id: delta.author_id.get(),
        ts: rfc3339_ms(delta.ts_ms),
        text: delta.body.text().unwrap_or(""),
        target: delta.body.target().map(|t| t.get()),
    };
    // A struct of strings and integers always converts.
    serde_json::to_value(record).unwrap_or_else(|_| json!({}))
}

/// A delta as one readable line: `[#3 12] 2026-11-22T10:00:00.000Z alice: hello`, not yet
/// escaped ([`Output::record`] does that).
fn delta_human(delta: &Delta) -> String {
    let head = format!("[#{} {}] {}", delta.room, delta.seq, rfc3339_ms(delta.ts_ms));
    let (author, text) = (&delta.author, delta.body.text().unwrap_or(""));
    match delta.kind() {
        DeltaKind::MESSAGE => format!("{head} {author}: {text}"),
        DeltaKind::CREATE => format!("{head} * {author} created the room \"{text}\""),
        DeltaKind::JOIN => format!("{head} * {author} joined"),
        DeltaKind::LEAVE => format!("{head} * {author} left"),
        DeltaKind::EDIT
        | DeltaKind::REPLY
        | DeltaKind::DELETE
        | DeltaKind::REACT
        | DeltaKind::UNREACT
        | DeltaKind::PIN
        | DeltaKind::UNPIN => {
            let target = delta.body.target().map_or(0, |t| t.get());
            match delta.kind() {
                DeltaKind::EDIT => format!("{head} * {author} edited {target}: {text}"),
                DeltaKind::REPLY => format!("{head} {author} (re {target}): {text}"),
                DeltaKind::DELETE => format!("{head} * {author} deleted {target}"),
                DeltaKind::REACT => format!("{head} * {author} reacted {text} to {target}"),
                DeltaKind::UNREACT => format!("{head} * {author} took back {text} on {target}"),
                DeltaKind::PIN => format!("{head} * {author} pinned {target}"),
                _ => format!("{head} * {author} unpinned {target}"),
            }
        }
        DeltaKind::INVITE => format!("{head} * {author} added {text}"),
        DeltaKind::KICK => format!("{head} * {author} removed {text}"),
        DeltaKind::BAN => format!("{head} * {author} banned {text}"),
        DeltaKind::UNBAN => format!("{head} * {author} lifted the ban on {text}"),
        DeltaKind::MUTE => format!("{head} * {author} muted {text}"),
        DeltaKind::UNMUTE => format!("{head} * {author} unmuted {text}"),
        DeltaKind::ROLE => match &delta.body {
            chime_protocol::DeltaBody::Role(r) => format!("{head} * {author} made user {} {}", r.user, r.role),
            _ => format!("{head} * {author} gave a role"),
        },
        DeltaKind::ROLE_DEFINED => format!("{head} * {author} defined the role {text}"),
        DeltaKind::CALL_INVITE => format!("{head} * {author} started a call"),
        DeltaKind::CALL_ACCEPT => {
            format!("{head} * {author} joined call {}", delta.body.target().map_or(0, |t| t.get()))
        }
        DeltaKind::CALL_END => format!("{head} * {author} ended call {}", delta.body.target().map_or(0, |t| t.get())),
        DeltaKind::FILE_SHARED => match &delta.body {
            chime_protocol::DeltaBody::FileShared(f) => {
                let caption = if f.caption.is_empty() { String::new() } else { format!(": {}", f.caption) };
                format!("{head} {author} shared file {} \"{}\" ({} bytes){caption}", f.file, f.name, f.size)
            }
            _ => format!("{head} * {author} shared a file"),
        },
        other => format!("{head} * {author} ({}) {text}", other.json_name()),
    }
}

/// A message in its current state as its JSON object (the shape `../shared/interface.md` fixes).
pub fn message_json(room: RoomId, m: &MessageView) -> Value {
    let reactions: serde_json::Map<String, Value> =
        m.reactions.iter().map(|r| (r.emoji.clone(), json!(r.count))).collect();
    json!({
        "room": room.get(),
        "seq": m.seq.get(),
        "author": m.author,
        "author_id": m.author_id.get(),
        "ts": rfc3339_ms(m.ts_ms),
        "text": m.text,
        "edited": m.edited_ms.is_some(),
        "deleted": m.deleted,
        "reactions": reactions,
        "reply_to": m.reply_to.map(|s| s.get()),
        "pinned": m.pinned,
    })
}

/// A message as one readable line: `[#3 5] 2026-...Z ann: hello (edited) [👍 2] (re 4) (pinned)`.
fn message_human(room: RoomId, m: &MessageView) -> String {
    let mut line = format!("[#{room} {}] {} {}: ", m.seq, rfc3339_ms(m.ts_ms), m.author);
    match &m.text {
        Some(text) => line.push_str(text),
        None => line.push_str("(deleted)"),
    }
    if m.edited_ms.is_some() && !m.deleted {
        line.push_str(" (edited)");
    }
    for r in &m.reactions {
        line.push_str(&format!(" [{} {}{}]", r.emoji, r.count, if r.mine { "*" } else { "" }));
    }
    if let Some(to) = m.reply_to {
        line.push_str(&format!(" (re {to})"));
    }
    if m.pinned {
        line.push_str(" (pinned)");
    }
    line
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds (`2026-11-22T10:00:00.000Z`).
///
/// The value comes from the server; one outside the representable range is printed as
/// `@MILLIS` rather than failing the whole listing.
pub fn rfc3339_ms(ts_ms: i64) -> String {
    let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| format!("@{ts_ms}"))
}

/// `text` with every character the terminal would not show as text replaced by a visible escape
/// (`\u{202e}`, `\n`); see the module doc for which and why.
pub fn escape_for_terminal(text: &str) -> String {
    if !text.chars().any(needs_escape) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    // Whether the last character printed (skipping a VS16) was an emoji a ZWJ may join to.
    let mut after_emoji = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ZWJ && after_emoji && chars.peek().is_some_and(|&next| joinable_emoji(next)) {
            out.push(c);
            after_emoji = false;
        } else if needs_escape(c) {
            out.extend(c.escape_default());
            after_emoji = false;
        } else {
            out.push(c);
            if c != VS16 {
                after_emoji = joinable_emoji(c);
            }
        }
    }
    out
}

/// U+200D ZERO WIDTH JOINER.
const ZWJ: char = '\u{200d}';
/// U+FE0F VARIATION SELECTOR-16, which asks for the emoji presentation of the character before it.
const VS16: char = '\u{fe0f}';

/// Whether `c` is printed as an escape: categories Cc, Cf, Zl, Zp, Co, Cn (Cs cannot be a `char`).
fn needs_escape(c: char) -> bool {
    use GeneralCategory::*;
    matches!(
        c.general_category(),
        Control | Format | LineSeparator | ParagraphSeparator | PrivateUse | Unassigned | Surrogate
    )
}

/// Whether a ZWJ next to `c` may stay: `c` is an emoji (skin-tone modifiers included) outside ASCII,
/// whose `Emoji=Yes` digits, `#` and `*` are ordinary text.
fn joinable_emoji(c: char) -> bool {
    !c.is_ascii() && c.is_emoji_char()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chime_protocol::{CreateBody, DeltaBody, RoomId, Seq, UserId};

    fn delta(kind: DeltaKind, text: &str) -> Delta {
        let body = match kind {
            DeltaKind::MESSAGE => DeltaBody::message(text),
            DeltaKind::CREATE => DeltaBody::Create(CreateBody { name: text.into() }),
            DeltaKind::JOIN => DeltaBody::Join,
            DeltaKind::LEAVE => DeltaBody::Leave,
            kind => DeltaBody::Unknown { kind, payload: text.as_bytes().to_vec() },
        };
        Delta {
            room: RoomId(3),
            seq: Seq(12),
            author_id: UserId(5),
            author: "alice".into(),
            // 2026-11-22T10:00:00.042Z
            ts_ms: 1_795_341_600_042,
            body,
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_341_600_042), "2026-11-22T10:00:00.042Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(i64::MAX), format!("@{}", i64::MAX));
    }

    #[test]
    fn delta_json_has_the_interface_fields() {
        let value = delta_json(&delta(DeltaKind::MESSAGE, "hello \"you\""));
        assert_eq!(
            value,
            json!({"room":3,"seq":12,"kind":"message","author":"alice","author_id":5,
                   "ts":"2026-11-22T10:00:00.042Z","text":"hello \"you\""})
        );
        assert_eq!(delta_json(&delta(DeltaKind::CREATE, "general"))["kind"], "create");
        assert_eq!(delta_json(&delta(DeltaKind::JOIN, ""))["kind"], "join");
        assert_eq!(delta_json(&delta(DeltaKind::LEAVE, ""))["kind"], "leave");
        assert_eq!(delta_json(&delta(DeltaKind(99), ""))["kind"], "unknown_99");
    }

    #[test]
    fn json_output_is_one_object_per_line() {
        let mut out = Output::new(true, Vec::new());
        out.delta(&delta(DeltaKind::MESSAGE, "two\nlines")).expect("write");
        out.record(&json!({"room":3}), "ignored").expect("write");
        let text = String::from_utf8(out.into_inner()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first: Value = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(first["text"], "two\nlines");
        assert_eq!(lines[1], r#"{"room":3}"#);
    }

    /// The human line `Output` prints for `delta`, without its newline.
    fn human(delta: &Delta) -> String {
        let mut out = Output::new(false, Vec::new());
        out.delta(delta).expect("write");
        let line = String::from_utf8(out.into_inner()).expect("utf-8");
        line.strip_suffix('\n').expect("one line").to_owned()
    }

    #[test]
    fn human_output_is_readable_and_escapes_the_whole_line() {
        assert_eq!(human(&delta(DeltaKind::MESSAGE, "hello")), "[#3 12] 2026-11-22T10:00:00.042Z alice: hello");
        assert_eq!(human(&delta(DeltaKind::JOIN, "")), "[#3 12] 2026-11-22T10:00:00.042Z * alice joined");
        let evil = human(&delta(DeltaKind::MESSAGE, "\u{1b}[2Jgone\r"));
        assert_eq!(evil, "[#3 12] 2026-11-22T10:00:00.042Z alice: \\u{1b}[2Jgone\\r");

        let mut spoof = delta(DeltaKind::MESSAGE, "see \u{202e}txt.exe\nnext");
        spoof.author = "mal\u{2067}lory".into();
        assert_eq!(human(&spoof), "[#3 12] 2026-11-22T10:00:00.042Z mal\\u{2067}lory: see \\u{202e}txt.exe\\nnext");
        assert_eq!(
            human(&delta(DeltaKind::CREATE, "gen\u{200b}eral")),
            "[#3 12] 2026-11-22T10:00:00.042Z * alice created the room \"gen\\u{200b}eral\""
        );

        // Any human record, not only deltas: commands cannot forget to escape.
        let mut out = Output::new(false, Vec::new());
        out.record(&json!({}), "plain").expect("write");
        out.record(&json!({}), "#3 \u{2066}room\u{2069} (latest seq 1)").expect("write");
        assert_eq!(out.into_inner(), b"plain\n#3 \\u{2066}room\\u{2069} (latest seq 1)\n");
    }

    #[test]
    fn format_characters_separators_and_unassigned_are_escaped() {
        for (raw, shown) in [
            ("a\u{202e}b", "a\\u{202e}b"),                                  // RIGHT-TO-LEFT OVERRIDE
            ("a\u{202a}\u{202c}b", "a\\u{202a}\\u{202c}b"),                 // embedding, pop
            ("a\u{2066}b\u{2069}", "a\\u{2066}b\\u{2069}"),                 // isolate, pop isolate
            ("a\u{200e}\u{200f}\u{061c}b", "a\\u{200e}\\u{200f}\\u{61c}b"), // LRM, RLM, ALM
            ("a\u{200b}b", "a\\u{200b}b"),                                  // ZERO WIDTH SPACE
            ("a\u{2060}\u{2064}b", "a\\u{2060}\\u{2064}b"),                 // word joiner, invisible plus
            ("\u{feff}a", "\\u{feff}a"),                                    // BOM / ZWNBSP
            ("soft\u{ad}hyphen", "soft\\u{ad}hyphen"),
            ("a\u{fff9}b\u{fffa}c\u{fffb}", "a\\u{fff9}b\\u{fffa}c\\u{fffb}"), // annotations
            ("hi\u{e0041}\u{e007f}", "hi\\u{e0041}\\u{e007f}"),                // tag characters
            ("line\u{2028}para\u{2029}", "line\\u{2028}para\\u{2029}"),        // Zl, Zp
            ("a\u{85}b\u{0}c\td", "a\\u{85}b\\u{0}c\\td"),                     // C1 NEL, NUL, tab (Cc)
            ("pua\u{e000}\u{f0000}", "pua\\u{e000}\\u{f0000}"),                // Co
            ("cn\u{378}\u{ffff}\u{10ffff}", "cn\\u{378}\\u{ffff}\\u{10ffff}"), // Cn
        ] {
            assert_eq!(escape_for_terminal(raw), shown, "{raw:?}");
            assert_eq!(escape_for_terminal(shown), shown, "escaping twice changes nothing");
        }
    }

    #[test]
    fn ordinary_text_in_any_script_is_unchanged() {
        for text in [
            "plain ASCII, with \"quotes\" and a \\ backslash",
            "مرحبا بالعالم",          // Arabic
            "שָׁלוֹם עולם",              // Hebrew with niqqud (Mn)
            "你好，世界　こんにちは", // CJK with an ideographic space (Zs)
            "안녕하세요",             // Hangul
            "नमस्ते",                   // Devanagari with a virama (Mn)
            "e\u{301}te\u{301}",      // combining acute (Mn)
            "non\u{a0}breaking",      // NO-BREAK SPACE (Zs)
            "👍🏽 ❤️ 1️⃣",               // skin tone, VS16, keycap
        ] {
            assert_eq!(escape_for_terminal(text), text);
        }
    }

    #[test]
    fn a_zwj_stays_only_between_two_emoji() {
        for sequence in [
            "\u{1f469}\u{1f3fd}\u{200d}\u{1f4bb}", // woman technologist: medium skin tone
            "\u{1f3f3}\u{fe0f}\u{200d}\u{1f308}",  // rainbow flag
            "\u{1f3c3}\u{200d}\u{2640}\u{fe0f}",   // woman running
            "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}", // family
            "\u{2764}\u{fe0f}\u{200d}\u{1f525}",   // heart on fire
        ] {
            assert_eq!(escape_for_terminal(sequence), sequence);
            assert_eq!(escape_for_terminal(&format!("say {sequence}!")), format!("say {sequence}!"));
        }
        for (raw, shown) in [
            ("a\u{200d}b", "a\\u{200d}b"),       // between letters
            ("bob1\u{200d}2", "bob1\\u{200d}2"), // digits are Emoji=Yes but ASCII
            ("1\u{fe0f}\u{200d}\u{1f600}", "1\u{fe0f}\\u{200d}\u{1f600}"),
            ("\u{1f600}\u{200d}", "\u{1f600}\\u{200d}"), // dangling
            ("\u{200d}\u{1f600}", "\\u{200d}\u{1f600}"),
            ("\u{1f600}\u{200d}a", "\u{1f600}\\u{200d}a"),
            ("\u{1f600}\u{200d}\u{200d}\u{1f600}", "\u{1f600}\\u{200d}\\u{200d}\u{1f600}"),
            ("\u{1f600}\u{200d}\u{202e}\u{1f600}", "\u{1f600}\\u{200d}\\u{202e}\u{1f600}"),
            ("می\u{200c}خواهم", "می\\u{200c}خواهم"), // ZWNJ in Persian: escaped, see the doc
            // Scotland: a tag sequence, whose tags are escaped.
            (
                "\u{1f3f4}\u{e0067}\u{e0062}\u{e0073}\u{e0063}\u{e0074}\u{e007f}",
                "\u{1f3f4}\\u{e0067}\\u{e0062}\\u{e0073}\\u{e0063}\\u{e0074}\\u{e007f}",
            ),
        ] {
            assert_eq!(escape_for_terminal(raw), shown, "{raw:?}");
        }
    }
}
