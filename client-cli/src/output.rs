//! Everything `chime` prints on stdout: JSON objects for `--json`, readable lines otherwise.
//!
//! Each record is one line, written and flushed at once, so `tail` output reaches a pipe as it
//! happens and a reader never sees half a line. Delta timestamps are RFC 3339 in UTC with
//! milliseconds. Human output escapes control characters in text that other users wrote, so a
//! message cannot move the cursor or recolour the terminal.

use chime_protocol::{Delta, DeltaKind};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{self, Write};
use time::macros::format_description;
use time::OffsetDateTime;

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

    /// Prints one record: `json` as a single line with `--json`, else `human`.
    pub fn record(&mut self, json: &Value, human: &str) -> io::Result<()> {
        if self.json {
            // Serializing a `Value` to a writer only fails on an I/O error.
            serde_json::to_writer(&mut self.out, json).map_err(io::Error::from)?;
            self.out.write_all(b"\n")?;
        } else {
            writeln!(self.out, "{human}")?;
        }
        self.out.flush()
    }

    /// Prints one delta.
    pub fn delta(&mut self, delta: &Delta) -> io::Result<()> {
        self.record(&delta_json(delta), &delta_human(delta))
    }

    /// The writer, for tests.
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A delta as its JSON object.
pub fn delta_json(delta: &Delta) -> Value {
    #[derive(Serialize)]
    struct DeltaJson<'a> {
        room: u64,
        seq: u64,
        kind: String,
        author: &'a str,
        author_id: u64,
        ts: String,
        text: &'a str,
    }
    let record = DeltaJson {
        room: delta.room,
        seq: delta.seq,
        kind: delta.kind.json_name(),
        author: &delta.author,
        author_id: delta.author_id,
        ts: rfc3339_ms(delta.ts_ms),
        text: &delta.text,
    };
    // A struct of strings and integers always converts.
    serde_json::to_value(record).unwrap_or_else(|_| json!({}))
}

/// A delta as one readable line: `[#3 12] 2026-11-22T10:00:00.000Z alice: hello`.
pub fn delta_human(delta: &Delta) -> String {
    let head = format!("[#{} {}] {}", delta.room, delta.seq, rfc3339_ms(delta.ts_ms));
    let author = escape_controls(&delta.author);
    let text = escape_controls(&delta.text);
    match delta.kind {
        DeltaKind::MESSAGE => format!("{head} {author}: {text}"),
        DeltaKind::CREATE => format!("{head} * {author} created the room \"{text}\""),
        DeltaKind::JOIN => format!("{head} * {author} joined"),
        DeltaKind::LEAVE => format!("{head} * {author} left"),
        other => format!("{head} * {author} ({}) {text}", other.json_name()),
    }
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

/// Replaces control characters (escape sequences, carriage returns, ...) with visible escapes.
pub fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(kind: DeltaKind, text: &str) -> Delta {
        Delta {
            room: 3,
            seq: 12,
            kind,
            author_id: 5,
            author: "alice".into(),
            // 2026-11-22T10:00:00.042Z
            ts_ms: 1_795_341_600_042,
            text: text.into(),
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

    #[test]
    fn human_output_is_readable_and_escapes_controls() {
        assert_eq!(delta_human(&delta(DeltaKind::MESSAGE, "hello")), "[#3 12] 2026-11-22T10:00:00.042Z alice: hello");
        assert_eq!(delta_human(&delta(DeltaKind::JOIN, "")), "[#3 12] 2026-11-22T10:00:00.042Z * alice joined");
        let evil = delta_human(&delta(DeltaKind::MESSAGE, "\u{1b}[2Jgone\r"));
        assert!(!evil.contains('\u{1b}') && !evil.contains('\r'), "{evil}");
        assert!(evil.ends_with("alice: \\u{1b}[2Jgone\\r"), "{evil}");
        let mut out = Output::new(false, Vec::new());
        out.record(&json!({}), "plain").expect("write");
        assert_eq!(out.into_inner(), b"plain\n");
    }
}
