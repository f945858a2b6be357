//! Files shared in rooms: upload sessions, file records, their permissions and the content they
//! point at, as both stores keep them (migration V12).
//!
//! The bytes are not here: the daemon's content store keeps them, addressed by SHA-256. The
//! database keeps what refers to them. A file record (FILE: owner, visible name, internal name,
//! upload time, size, hash, type) belongs to the `FILE_SHARED` delta that shared it; a forward
//! makes a new record on the same content, so each copy lives and dies with its own message. The
//! `contents` row counts the records that point at a hash: when a delete takes it to zero, the
//! daemon collects the bytes (under its per-content lock, re-checking the count with
//! [`crate::SharedStore::drop_content`], which removes the row only if it is still zero).
//!
//! The delta's `body` column for `FILE_SHARED` is [`encode_body`]'s text and its `target` column
//! is the file id, so a delta read back from the log carries its whole file reference without a
//! join.

use crate::{RoomId, Seq, UserId};

/// Unfinished uploads one user may have at once: each may hold up to the largest file on the
/// server's disk until it is finished, so their number is bounded.
pub const MAX_OPEN_UPLOADS: u64 = 16;

/// An upload to begin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUpload {
    /// Who uploads.
    pub user: UserId,
    /// The room the file will be shared in.
    pub room: RoomId,
    /// Its visible name.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// The SHA-256 announced.
    pub sha256: [u8; 32],
    /// When, Unix milliseconds.
    pub now_ms: i64,
}

/// An upload session as stored: durable, so a resume works after a reconnect or a restart (the
/// bytes stored so far are what its staging file holds, not a column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    /// Its id.
    pub id: u64,
    /// Who uploads.
    pub user: UserId,
    /// The room.
    pub room: RoomId,
    /// Visible name.
    pub name: String,
    /// Size announced.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// SHA-256 announced.
    pub sha256: [u8; 32],
}

/// A file to record and share, once its bytes are verified and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFile {
    /// The upload it finishes (removed in the same transaction).
    pub upload: u64,
    /// Owner and the owner's name.
    pub actor: (UserId, String),
    /// The room.
    pub room: RoomId,
    /// Visible name.
    pub name: String,
    /// Size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// SHA-256.
    pub sha256: [u8; 32],
    /// Text shown with it.
    pub caption: String,
    /// When, Unix milliseconds.
    pub now_ms: i64,
}

/// A file record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// Its id.
    pub id: u64,
    /// Who shared it (for a forward: who forwarded it).
    pub owner: UserId,
    /// Visible name.
    pub name: String,
    /// Internal name: the content's object name (its hash in hex).
    pub internal_name: String,
    /// When it was recorded, Unix milliseconds.
    pub uploaded_ms: i64,
    /// Size.
    pub size: u64,
    /// SHA-256.
    pub sha256: [u8; 32],
    /// Media type.
    pub media_type: String,
    /// The room and seq of the `FILE_SHARED` delta it belongs to.
    pub shared_in: (RoomId, Seq),
}

/// The delta body of `FILE_SHARED`: `SHA256_HEX \t SIZE \t MEDIA_TYPE \t NAME \t CAPTION`. Names
/// and media types hold no control characters (checked at upload), so only the caption, last,
/// may hold a tab.
pub fn encode_body(sha256: &[u8; 32], size: u64, media_type: &str, name: &str, caption: &str) -> String {
    format!("{}\t{size}\t{media_type}\t{name}\t{caption}", hex::encode(sha256))
}

/// The parts of a `FILE_SHARED` body: (sha256, size, media type, name, caption). A malformed
/// body (not written by this build) reads as zeros and empty strings.
pub fn decode_body(body: &str) -> ([u8; 32], u64, String, String, String) {
    let mut parts = body.splitn(5, '\t');
    let mut sha = [0u8; 32];
    if let Some(h) = parts.next() {
        let _ = hex::decode_to_slice(h, &mut sha);
    }
    let size = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let media = parts.next().unwrap_or("").to_string();
    let name = parts.next().unwrap_or("").to_string();
    let caption = parts.next().unwrap_or("").to_string();
    (sha, size, media, name, caption)
}

/// Whether a visible file name is acceptable: 1 to 255 bytes, no '/', no control characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.contains('/') && !name.chars().any(char::is_control)
}

/// Whether a media type is acceptable: at most 127 bytes, no control characters or spaces.
pub fn valid_media_type(t: &str) -> bool {
    t.len() <= 127 && !t.chars().any(|c| c.is_control() || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_with_tabs_in_the_caption() {
        let sha = [7u8; 32];
        let body = encode_body(&sha, 42, "text/plain", "a b.txt", "see\tthis");
        assert_eq!(decode_body(&body), (sha, 42, "text/plain".into(), "a b.txt".into(), "see\tthis".into()));
        assert_eq!(decode_body("junk").1, 0);
    }

    #[test]
    fn names_and_types_are_checked() {
        assert!(valid_name("report.pdf"));
        assert!(!valid_name("") && !valid_name("a/b") && !valid_name("a\tb") && !valid_name(&"x".repeat(256)));
        assert!(valid_media_type("image/png") && valid_media_type(""));
        assert!(!valid_media_type("a b"));
    }
}
