//! Frame header, incremental decoder and encoder.
//!
//! Every frame on the wire is:
//!
//! ```text
//! offset  size  field
//! 0       4     length      u32 big-endian: bytes that follow this field (6 + body length)
//! 4       2     type        u16 big-endian: a [`FrameType`] code
//! 6       4     request_id  u32 big-endian: echoed by the reply; 0 on server pushes
//! 10      n     body        postcard encoding of the type's body struct
//! ```
//!
//! Decoding is two steps, as in mini-redis: a cheap check that a whole frame is buffered
//! (incomplete is not an error), then split it off. Unlike mini-redis, a length over the maximum is
//! refused as soon as its four bytes arrive, before anything is buffered for it.

use crate::types::FrameType;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

/// Bytes in the frame header (length + type + request id).
pub const HEADER_LEN: usize = 10;

/// Bytes covered by the length field that are not body (type + request id).
const LEN_COVERED_HEADER: usize = 6;

/// The largest length field any frame may carry, in either direction: 1 MiB. The encoder refuses
/// to produce a longer frame ([`EncodeError::TooLarge`]); a receiver may set a lower limit.
pub const MAX_FRAME: u32 = 1 << 20;

/// The default maximum a decoder accepts: [`MAX_FRAME`].
pub const DEFAULT_MAX_FRAME: u32 = MAX_FRAME;

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded frame's length field would exceed [`MAX_FRAME`]; nothing was produced. The
    /// sender must split the content (page it) or refuse the request.
    #[error("{ty} frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The frame's type.
        ty: FrameType,
        /// The length field it would have had.
        len: usize,
        /// [`MAX_FRAME`].
        max: u32,
    },
}

/// Why bytes could not be decoded as a frame or a frame body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix is over the configured maximum. The stream cannot go on.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The length field's value.
        len: u32,
        /// The configured maximum.
        max: u32,
    },
    /// The length prefix is smaller than the type and request id it must cover.
    #[error("frame length {0} is shorter than the 6-byte header it must cover")]
    TooShort(u32),
    /// The type code is not one the decoding side knows (or not one it accepts in this direction).
    #[error("unknown frame type {0}")]
    UnknownType(FrameType),
    /// The body is not a valid postcard encoding of the type's body.
    #[error("malformed {ty} body: {reason}")]
    BadBody {
        /// The frame's type.
        ty: FrameType,
        /// What postcard said.
        reason: String,
    },
    /// The body decoded but bytes were left over.
    #[error("{ty} body has {extra} trailing bytes")]
    TrailingBytes {
        /// The frame's type.
        ty: FrameType,
        /// How many bytes were left.
        extra: usize,
    },
}

impl DecodeError {
    /// Whether the stream can go on after this error. A bad length means frame boundaries are
    /// lost; a bad body or unknown type in a well-delimited frame can be answered and skipped.
    pub fn is_fatal(&self) -> bool {
        matches!(self, DecodeError::TooLarge { .. } | DecodeError::TooShort(_))
    }
}

/// One whole frame, split off the stream, body not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The type code.
    pub ty: FrameType,
    /// The request id (0 for pushes).
    pub request_id: u32,
    /// The postcard-encoded body.
    pub body: Bytes,
}

/// An incremental frame decoder over a `BytesMut` that never panics on any input.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_len: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder refusing frames whose length field exceeds `max_len`.
    pub fn new(max_len: u32) -> Self {
        FrameDecoder { max_len }
    }

    /// The configured maximum length field.
    pub fn max_len(&self) -> u32 {
        self.max_len
    }

    /// How many bytes the frame at the front of `buf` needs in all, once its length is known;
    /// lets a reader reserve exactly once.
    pub fn needed(&self, buf: &[u8]) -> Option<usize> {
        let len = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?);
        (len <= self.max_len).then_some(4 + len as usize)
    }

    /// Splits one frame off the front of `buf`. `Ok(None)` means more bytes are needed.
    ///
    /// After an error for which [`DecodeError::is_fatal`] holds, frame boundaries are lost and the
    /// caller must close the stream; the decoder itself stays usable.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<RawFrame>, DecodeError> {
        let Some(len_bytes) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if len > self.max_len {
            return Err(DecodeError::TooLarge { len, max: self.max_len });
        }
        if (len as usize) < LEN_COVERED_HEADER {
            return Err(DecodeError::TooShort(len));
        }
        let total = 4 + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        let ty = FrameType(u16::from_be_bytes([frame[4], frame[5]]));
        let request_id = u32::from_be_bytes([frame[6], frame[7], frame[8], frame[9]]);
        let body = frame.split_off(HEADER_LEN).freeze();
        Ok(Some(RawFrame { ty, request_id, body }))
    }
}

/// Encodes one frame: header plus the postcard encoding of `body`. Refuses a frame whose length
/// field would exceed [`MAX_FRAME`].
pub fn encode<T: Serialize + ?Sized>(ty: FrameType, request_id: u32, body: &T) -> Result<Bytes, EncodeError> {
    let mut out = Vec::with_capacity(64);
    encode_into(&mut out, ty, request_id, body)?;
    Ok(Bytes::from(out))
}

/// Appends one encoded frame to `out` (for coalescing several frames into one write). On
/// [`EncodeError::TooLarge`] `out` is left as it was.
pub fn encode_into<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    ty: FrameType,
    request_id: u32,
    body: &T,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.put_u32(0);
    out.put_u16(ty.0);
    out.put_u32(request_id);
    // Serializing plain structs of integers, strings and vectors into a Vec cannot fail.
    let out_taken = std::mem::take(out);
    *out = match postcard::to_extend(body, out_taken) {
        Ok(v) => v,
        Err(e) => unreachable!("postcard failed to encode a body into a Vec: {e}"),
    };
    let len = out.len() - start - 4;
    if len > MAX_FRAME as usize {
        out.truncate(start);
        return Err(EncodeError::TooLarge { ty, len, max: MAX_FRAME });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Decodes a body, rejecting trailing bytes (as rustls' codec does).
pub fn decode_body<T: DeserializeOwned>(ty: FrameType, body: &[u8]) -> Result<T, DecodeError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(DecodeError::TrailingBytes { ty, extra: rest.len() }),
        Err(e) => Err(DecodeError::BadBody { ty, reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_oversized_length_before_buffering() {
        let dec = FrameDecoder::new(100);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 101][..]);
        assert_eq!(dec.decode(&mut buf), Err(DecodeError::TooLarge { len: 101, max: 100 }));
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let dec = FrameDecoder::default();
        let frame = encode(FrameType::PING, 7, &(5u64,)).unwrap();
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert_eq!(dec.decode(&mut buf), Ok(None));
            assert_eq!(buf.len(), cut);
        }
        let mut buf = BytesMut::from(&frame[..]);
        let raw = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!((raw.ty, raw.request_id, &raw.body[..]), (FrameType::PING, 7, &[5u8][..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_to_encode_an_oversized_frame() {
        let body = vec![0u8; MAX_FRAME as usize];
        let mut out = b"keep".to_vec();
        let err = encode_into(&mut out, FrameType::POST, 1, &body).unwrap_err();
        assert!(matches!(err, EncodeError::TooLarge { len, .. } if len > MAX_FRAME as usize), "{err}");
        assert_eq!(out, b"keep", "a refused frame leaves the buffer as it was");
        // The largest body that fits: 6 header bytes + a 3-byte varint length + the bytes.
        let fits = vec![0u8; MAX_FRAME as usize - 6 - 3];
        let frame = encode(FrameType::POST, 1, &fits).unwrap();
        assert_eq!(frame.len(), 4 + MAX_FRAME as usize);
    }
}
