//! The property every frame body must have, for either direction: decoding arbitrary body bytes
//! as a given type never panics, and a body that decodes is a faithful, canonical value.
//!
//! The input is a type code (two bytes, big-endian, as in the frame header) followed by the body.
//! What is checked:
//! - the decode result agrees with the code table: a code this direction's table does not have is
//!   `UnknownType` (never a panic, never another type's body), a known one is its own frame or a
//!   `BadBody`/`TrailingBytes` error naming that code;
//! - a body that decodes, with one byte appended, is refused as `TrailingBytes { extra: 1 }`;
//! - re-encoding gives the same type and request id in a well-formed header, and the same body
//!   bytes; or, when postcard accepted a non-shortest varint or a delta payload carried bytes past
//!   the fields its kind has (a later version's fields, ignored), a strictly shorter body that
//!   decodes to the same value and encodes to itself (the encoding is canonical);
//! - the direction's own rule ([`Direction::rule`]).

use bytes::Bytes;
use chime_protocol::{ClientFrame, DecodeError, EncodeError, FrameType, RawFrame, ServerFrame, HEADER_LEN};
use std::fmt::Debug;

/// One direction's frame enum, as the checks see it.
pub trait Direction: Sized + PartialEq + Debug {
    /// Whether this direction's code table has `ty` (every code `FrameType` names belongs to
    /// exactly one direction: client codes are below `0x8000`).
    fn known(ty: FrameType) -> bool;
    /// Decodes a raw frame (the crate's `decode`).
    fn decode(raw: &RawFrame) -> Result<Self, DecodeError>;
    /// Encodes with a header (the crate's `encode`).
    fn encode(&self, request_id: u32) -> Result<Bytes, EncodeError>;
    /// The frame's type code.
    fn frame_type(&self) -> FrameType;
    /// A rule of this direction that a decoded frame must satisfy.
    fn rule(&self);
}

impl Direction for ClientFrame {
    fn known(ty: FrameType) -> bool {
        ty.name().is_some() && ty.0 < 0x8000
    }
    fn decode(raw: &RawFrame) -> Result<Self, DecodeError> {
        ClientFrame::decode(raw)
    }
    fn encode(&self, request_id: u32) -> Result<Bytes, EncodeError> {
        ClientFrame::encode(self, request_id)
    }
    fn frame_type(&self) -> FrameType {
        ClientFrame::frame_type(self)
    }
    /// A client never sends a code from the server's ranges.
    fn rule(&self) {
        assert!(self.frame_type().0 < 0x8000 && !self.frame_type().is_push(), "{self:?}");
    }
}

impl Direction for ServerFrame {
    fn known(ty: FrameType) -> bool {
        ty.name().is_some() && ty.0 >= 0x8000
    }
    fn decode(raw: &RawFrame) -> Result<Self, DecodeError> {
        ServerFrame::decode(raw)
    }
    fn encode(&self, request_id: u32) -> Result<Bytes, EncodeError> {
        ServerFrame::encode(self, request_id)
    }
    fn frame_type(&self) -> FrameType {
        ServerFrame::frame_type(self)
    }
    /// `is_push` is how a client tells a push from a reply to its request (the blocking client
    /// never takes a push as the answer to a request with the same id): exactly DELTA, GOODBYE,
    /// SETTING_CHANGED, READ_STATE_CHANGED, TYPING_NOW, PRESENCE_CHANGED, UNREAD_AT_LOGIN and
    /// FILE_CHUNK are pushes.
    fn rule(&self) {
        let push = matches!(
            self,
            ServerFrame::Delta(_)
                | ServerFrame::Goodbye(_)
                | ServerFrame::SettingChanged(_)
                | ServerFrame::ReadStateChanged(_)
                | ServerFrame::TypingNow(_)
                | ServerFrame::PresenceChanged(_)
                | ServerFrame::UnreadAtLogin(_)
                | ServerFrame::FileChunk(_)
        );
        assert_eq!(self.frame_type().is_push(), push, "{self:?}");
    }
}

/// Runs every check on one input: a type code, then body bytes.
pub fn check<D: Direction>(data: &[u8]) {
    let [hi, lo, body @ ..] = data else { return };
    let ty = FrameType(u16::from_be_bytes([*hi, *lo]));
    // Some id that is not 0, so a header that drops it would show.
    let request_id = 0x0102_0304;
    let raw = |body: &[u8]| RawFrame { ty, request_id, body: Bytes::copy_from_slice(body) };
    let frame = match D::decode(&raw(body)) {
        Ok(frame) => frame,
        Err(DecodeError::UnknownType(t)) => {
            assert!(t == ty && !D::known(ty), "{ty} refused as the unknown type {t}");
            return;
        }
        Err(DecodeError::BadBody { ty: t, .. } | DecodeError::TrailingBytes { ty: t, .. }) => {
            assert!(t == ty && D::known(ty), "a {ty} body error names {t}");
            return;
        }
        Err(e) => panic!("a body decode returned a framing error: {e}"),
    };
    assert!(D::known(ty), "{ty} is not in this direction's table but decoded");
    assert_eq!(frame.frame_type(), ty);
    frame.rule();

    let mut longer = body.to_vec();
    longer.push(0);
    assert_eq!(D::decode(&raw(&longer)), Err(DecodeError::TrailingBytes { ty, extra: 1 }));

    // libFuzzer inputs are far below MAX_FRAME and a re-encoding is never longer.
    let encoded = frame.encode(request_id).expect("a decoded body re-encodes");
    let (header, again) = encoded.split_at(HEADER_LEN);
    assert_eq!(header[..4], ((again.len() + 6) as u32).to_be_bytes(), "length field");
    assert_eq!(header[4..6], ty.0.to_be_bytes(), "type code");
    assert_eq!(header[6..], request_id.to_be_bytes(), "request id");
    if again != body {
        assert!(
            again.len() < body.len(),
            "{ty}: a re-encoding differs from {body:02x?} but is not shorter: {again:02x?}"
        );
        let redecoded = D::decode(&raw(again)).expect("a re-encoding decodes");
        assert_eq!(redecoded, frame, "{ty}: the re-encoding decodes to another value");
        let third = redecoded.encode(request_id).expect("re-encodes");
        assert_eq!(third, encoded, "{ty}: encoding is not canonical");
    }
}
