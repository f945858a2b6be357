//! The text a load sender posts: who sent it, its number, and when, so a receiver can measure
//! post-to-publish latency without a shared clock beyond the run's own epoch.

use std::fmt::Write;

/// What a load message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The sender's index in the run.
    pub sender: u32,
    /// The sender's message counter, from 0.
    pub counter: u64,
    /// When it was sent, nanoseconds since the run's epoch.
    pub sent_ns: u64,
}

/// The prefix that marks a load message.
const PREFIX: &str = "chime-load ";

impl Stamp {
    /// The message text, padded with `x` up to `min_len` bytes.
    pub fn encode(&self, min_len: usize) -> String {
        let mut text = String::with_capacity(min_len.max(48));
        let _ = write!(text, "{PREFIX}{} {} {}", self.sender, self.counter, self.sent_ns);
        if text.len() < min_len {
            text.push(' ');
            while text.len() < min_len {
                text.push('x');
            }
        }
        text
    }

    /// Parses a text made by [`Stamp::encode`]; `None` for any other text.
    pub fn parse(text: &str) -> Option<Stamp> {
        let mut fields = text.strip_prefix(PREFIX)?.split(' ');
        let sender = fields.next()?.parse().ok()?;
        let counter = fields.next()?.parse().ok()?;
        let sent_ns = fields.next()?.parse().ok()?;
        Some(Stamp { sender, counter, sent_ns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_and_without_padding() {
        let s = Stamp { sender: 7, counter: 123_456, sent_ns: 987_654_321_000 };
        assert_eq!(Stamp::parse(&s.encode(0)), Some(s));
        let padded = s.encode(200);
        assert_eq!(padded.len(), 200);
        assert_eq!(Stamp::parse(&padded), Some(s));
    }

    #[test]
    fn rejects_foreign_text() {
        assert_eq!(Stamp::parse("hello"), None);
        assert_eq!(Stamp::parse("chime-load 1 two 3"), None);
        assert_eq!(Stamp::parse("chime-load 1 2"), None);
    }
}
