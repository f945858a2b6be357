//! A delta's body: its kind and a payload tagged by that kind.
//!
//! On the wire a body is `kind` (a [`DeltaKind`], varint) followed by `payload` (a varint length,
//! then that many bytes), and the payload is the postcard encoding of the kind's struct
//! ([`CreateBody`], [`MessageBody`], nothing for `JOIN`/`LEAVE`). Because the payload carries its
//! own length, a client that meets a kind it does not know still decodes the whole delta (as
//! [`DeltaBody::Unknown`]), can skip it, and advances its cursor past its seq. New kinds therefore
//! add payloads without touching the others, and a kind's payload may grow later by appending
//! fields: a decoder reads the fields it knows and ignores the bytes after them.

use crate::perm::Permissions;
use crate::types::{DeltaKind, Seq, UserId};
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The payload of a `CREATE` delta (always a room's seq 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateBody {
    /// The room's name.
    pub name: String,
}

/// The payload of a `MESSAGE` delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageBody {
    /// The message.
    pub text: String,
}

/// The payload of an `EDIT` delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditBody {
    /// The message edited (a `MESSAGE` or `REPLY` delta of the same room).
    pub target: Seq,
    /// Its new text.
    pub text: String,
}

/// The payload of the deltas that name only the message they act on: `DELETE`, `PIN`, `UNPIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetBody {
    /// The message acted on.
    pub target: Seq,
}

/// The payload of `REACT` and `UNREACT` deltas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactBody {
    /// The message reacted to.
    pub target: Seq,
    /// The reaction: one emoji (a short grapheme cluster).
    pub emoji: String,
}

/// The payload of a `REPLY` delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyBody {
    /// The message answered.
    pub reply_to: Seq,
    /// The reply's text.
    pub text: String,
}

/// The payload of the deltas about one user: `INVITE`, `KICK`, `BAN`, `UNBAN`, `MUTE`, `UNMUTE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberBody {
    /// The user acted on.
    pub user: UserId,
    /// Their name.
    pub name: String,
}

/// The payload of a `ROLE` delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleBody {
    /// The member.
    pub user: UserId,
    /// Their new role.
    pub role: String,
}

/// The payload of a `ROLE_DEFINED` delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleDefinedBody {
    /// The role.
    pub role: String,
    /// What it allows from now on; none when the definition was removed.
    pub permissions: Option<Permissions>,
}

/// The payload of the call signalling deltas: `CALL_INVITE`, `CALL_ACCEPT`, `CALL_END`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallBody {
    /// The call: the seq of its `CALL_INVITE` (0 in the invite itself).
    pub call: Seq,
    /// Anything the clients' media layer needs (an SDP offer or answer, a reason), opaque to the
    /// server; at most 8 KiB.
    pub data: String,
}

/// The payload of a `FILE_SHARED` delta: a reference to a file record, never its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileBody {
    /// The file record's id (what `DOWNLOAD` names).
    pub file: u64,
    /// The name the uploader gave it.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type as the uploader announced it (e.g. `image/png`), not checked.
    pub media_type: String,
    /// The SHA-256 of its bytes.
    pub sha256: [u8; 32],
    /// Text shown with it; may be empty.
    pub caption: String,
}

/// What a delta does, tagged by its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaBody {
    /// The room was created.
    Create(CreateBody),
    /// A chat message.
    Message(MessageBody),
    /// The author joined.
    Join,
    /// The author left.
    Leave,
    /// A message was edited.
    Edit(EditBody),
    /// A message was deleted. In a secret room the deleted message's own delta (and those of its
    /// edits) become tombstones: their text is gone for good.
    Delete(TargetBody),
    /// A reaction was added.
    React(ReactBody),
    /// A reaction was taken back.
    Unreact(ReactBody),
    /// A reply to a message.
    Reply(ReplyBody),
    /// A message was pinned.
    Pin(TargetBody),
    /// A message was unpinned.
    Unpin(TargetBody),
    /// A user was made a member.
    Invite(MemberBody),
    /// A member was removed.
    Kick(MemberBody),
    /// A user was banned.
    Ban(MemberBody),
    /// A ban was lifted.
    Unban(MemberBody),
    /// A member was muted.
    Mute(MemberBody),
    /// A member was unmuted.
    Unmute(MemberBody),
    /// A member got a role.
    Role(RoleBody),
    /// A role was defined or removed.
    RoleDefined(RoleDefinedBody),
    /// A call was started.
    CallInvite(CallBody),
    /// A call was joined.
    CallAccept(CallBody),
    /// A call was ended or left.
    CallEnd(CallBody),
    /// A file was shared (boxed: it is the largest body, and deltas are many).
    FileShared(Box<FileBody>),
    /// A kind this build does not know, kept as it came so that it can be skipped (or passed
    /// on unchanged).
    Unknown {
        /// The kind.
        kind: DeltaKind,
        /// Its payload, undecoded.
        payload: Vec<u8>,
    },
}

impl DeltaBody {
    /// A `MESSAGE` body.
    pub fn message(text: impl Into<String>) -> DeltaBody {
        DeltaBody::Message(MessageBody { text: text.into() })
    }

    /// The kind, the tag on the wire.
    pub fn kind(&self) -> DeltaKind {
        match self {
            DeltaBody::Create(_) => DeltaKind::CREATE,
            DeltaBody::Message(_) => DeltaKind::MESSAGE,
            DeltaBody::Join => DeltaKind::JOIN,
            DeltaBody::Leave => DeltaKind::LEAVE,
            DeltaBody::Edit(_) => DeltaKind::EDIT,
            DeltaBody::Delete(_) => DeltaKind::DELETE,
            DeltaBody::React(_) => DeltaKind::REACT,
            DeltaBody::Unreact(_) => DeltaKind::UNREACT,
            DeltaBody::Reply(_) => DeltaKind::REPLY,
            DeltaBody::Pin(_) => DeltaKind::PIN,
            DeltaBody::Unpin(_) => DeltaKind::UNPIN,
            DeltaBody::Invite(_) => DeltaKind::INVITE,
            DeltaBody::Kick(_) => DeltaKind::KICK,
            DeltaBody::Ban(_) => DeltaKind::BAN,
            DeltaBody::Unban(_) => DeltaKind::UNBAN,
            DeltaBody::Mute(_) => DeltaKind::MUTE,
            DeltaBody::Unmute(_) => DeltaKind::UNMUTE,
            DeltaBody::Role(_) => DeltaKind::ROLE,
            DeltaBody::RoleDefined(_) => DeltaKind::ROLE_DEFINED,
            DeltaBody::CallInvite(_) => DeltaKind::CALL_INVITE,
            DeltaBody::CallAccept(_) => DeltaKind::CALL_ACCEPT,
            DeltaBody::CallEnd(_) => DeltaKind::CALL_END,
            DeltaBody::FileShared(_) => DeltaKind::FILE_SHARED,
            DeltaBody::Unknown { kind, .. } => *kind,
        }
    }

    /// The text a person reads for it: a message's, a reply's or an edit's text, a created
    /// room's name, a reaction's emoji; else nothing.
    pub fn text(&self) -> Option<&str> {
        match self {
            DeltaBody::Create(c) => Some(&c.name),
            DeltaBody::Message(m) => Some(&m.text),
            DeltaBody::Edit(e) => Some(&e.text),
            DeltaBody::Reply(r) => Some(&r.text),
            DeltaBody::React(r) | DeltaBody::Unreact(r) => Some(&r.emoji),
            DeltaBody::Invite(m)
            | DeltaBody::Kick(m)
            | DeltaBody::Ban(m)
            | DeltaBody::Unban(m)
            | DeltaBody::Mute(m)
            | DeltaBody::Unmute(m) => Some(&m.name),
            DeltaBody::Role(r) => Some(&r.role),
            DeltaBody::RoleDefined(r) => Some(&r.role),
            DeltaBody::FileShared(f) => Some(&f.caption),
            _ => None,
        }
    }

    /// The message this delta acts on or answers (edits, deletes, reactions, pins, replies).
    pub fn target(&self) -> Option<Seq> {
        match self {
            DeltaBody::Edit(e) => Some(e.target),
            DeltaBody::Delete(t) | DeltaBody::Pin(t) | DeltaBody::Unpin(t) => Some(t.target),
            DeltaBody::React(r) | DeltaBody::Unreact(r) => Some(r.target),
            DeltaBody::Reply(r) => Some(r.reply_to),
            DeltaBody::CallAccept(c) | DeltaBody::CallEnd(c) => Some(c.call),
            _ => None,
        }
    }

    /// The payload's encoding.
    fn payload(&self) -> Result<Vec<u8>, postcard::Error> {
        match self {
            DeltaBody::Create(c) => postcard::to_allocvec(c),
            DeltaBody::Message(m) => postcard::to_allocvec(m),
            DeltaBody::Join | DeltaBody::Leave => Ok(Vec::new()),
            DeltaBody::Edit(e) => postcard::to_allocvec(e),
            DeltaBody::Delete(t) | DeltaBody::Pin(t) | DeltaBody::Unpin(t) => postcard::to_allocvec(t),
            DeltaBody::React(r) | DeltaBody::Unreact(r) => postcard::to_allocvec(r),
            DeltaBody::Reply(r) => postcard::to_allocvec(r),
            DeltaBody::Invite(m)
            | DeltaBody::Kick(m)
            | DeltaBody::Ban(m)
            | DeltaBody::Unban(m)
            | DeltaBody::Mute(m)
            | DeltaBody::Unmute(m) => postcard::to_allocvec(m),
            DeltaBody::Role(r) => postcard::to_allocvec(r),
            DeltaBody::RoleDefined(r) => postcard::to_allocvec(r),
            DeltaBody::CallInvite(c) | DeltaBody::CallAccept(c) | DeltaBody::CallEnd(c) => postcard::to_allocvec(c),
            DeltaBody::FileShared(f) => postcard::to_allocvec(f),
            DeltaBody::Unknown { payload, .. } => Ok(payload.clone()),
        }
    }

    /// Decodes a payload of `kind`. Bytes after the fields this build knows are ignored: a later
    /// version may append fields to a kind's payload.
    fn from_payload(kind: DeltaKind, payload: Vec<u8>) -> Result<DeltaBody, postcard::Error> {
        Ok(match kind {
            DeltaKind::CREATE => DeltaBody::Create(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::MESSAGE => DeltaBody::Message(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::JOIN => DeltaBody::Join,
            DeltaKind::LEAVE => DeltaBody::Leave,
            DeltaKind::EDIT => DeltaBody::Edit(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::DELETE => DeltaBody::Delete(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::REACT => DeltaBody::React(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::UNREACT => DeltaBody::Unreact(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::REPLY => DeltaBody::Reply(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::PIN => DeltaBody::Pin(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::UNPIN => DeltaBody::Unpin(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::INVITE => DeltaBody::Invite(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::KICK => DeltaBody::Kick(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::BAN => DeltaBody::Ban(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::UNBAN => DeltaBody::Unban(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::MUTE => DeltaBody::Mute(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::UNMUTE => DeltaBody::Unmute(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::ROLE => DeltaBody::Role(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::ROLE_DEFINED => DeltaBody::RoleDefined(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::CALL_INVITE => DeltaBody::CallInvite(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::CALL_ACCEPT => DeltaBody::CallAccept(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::CALL_END => DeltaBody::CallEnd(postcard::take_from_bytes(&payload)?.0),
            DeltaKind::FILE_SHARED => DeltaBody::FileShared(postcard::take_from_bytes(&payload)?.0),
            kind => DeltaBody::Unknown { kind, payload },
        })
    }
}

/// A byte string that postcard writes as a varint length and the raw bytes.
struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl Serialize for DeltaBody {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let payload = self.payload().map_err(S::Error::custom)?;
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&self.kind())?;
        t.serialize_element(&RawBytes(&payload))?;
        t.end()
    }
}

/// Reads the payload's bytes whichever way the format hands them over.
struct PayloadVisitor;

impl<'de> Visitor<'de> for PayloadVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a delta payload (bytes)")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

struct Payload(Vec<u8>);

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_byte_buf(PayloadVisitor).map(Payload)
    }
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = DeltaBody;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a delta body (kind, payload)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DeltaBody, A::Error> {
        let kind: DeltaKind = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let Payload(payload) = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
        DeltaBody::from_payload(kind, payload)
            .map_err(|e| de::Error::custom(format_args!("payload of delta kind {kind}: {e}")))
    }
}

impl<'de> Deserialize<'de> for DeltaBody {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_tuple(2, BodyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(body: &DeltaBody) -> Vec<u8> {
        let bytes = postcard::to_allocvec(body).expect("encodes");
        let back: DeltaBody = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(&back, body);
        bytes
    }

    #[test]
    fn a_body_is_its_kind_then_a_length_prefixed_payload() {
        assert_eq!(round_trip(&DeltaBody::message("hi")), [2, 3, 2, b'h', b'i']);
        assert_eq!(round_trip(&DeltaBody::Join), [3, 0]);
        assert_eq!(round_trip(&DeltaBody::Leave), [4, 0]);
        let create = DeltaBody::Create(CreateBody { name: "r".into() });
        assert_eq!(round_trip(&create), [1, 2, 1, b'r']);
    }

    #[test]
    fn an_unknown_kind_is_kept_whole() {
        let body = DeltaBody::Unknown { kind: DeltaKind(0x1234), payload: vec![9, 8, 7] };
        assert_eq!(round_trip(&body), [0xb4, 0x24, 3, 9, 8, 7]);
        assert_eq!(body.text(), None);
    }

    #[test]
    fn fields_appended_to_a_known_payload_are_ignored() {
        // A later version's MESSAGE with one more field after the text.
        let bytes = [2, 4, 2, b'h', b'i', 42];
        let body: DeltaBody = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(body, DeltaBody::message("hi"));
    }

    #[test]
    fn a_payload_that_does_not_decode_as_its_kind_is_an_error() {
        // MESSAGE whose text length runs past the payload.
        assert!(postcard::from_bytes::<DeltaBody>(&[2, 2, 5, b'h']).is_err());
        // A payload length past the input.
        assert!(postcard::from_bytes::<DeltaBody>(&[3, 9, 1]).is_err());
    }
}

/// Serde for a byte string field: postcard writes a varint length and the raw bytes (the same
/// bytes as a `Vec<u8>`'s default encoding), and reads them in one copy instead of one element at
/// a time, which matters for 64 KiB file chunks.
pub mod bytes_field {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    /// Writes `v` as a byte string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Reads a byte string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}
