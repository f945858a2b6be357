//! The server's side of the frame decoder: any bytes a client can send, split into frames by
//! `FrameDecoder` and decoded as client frames, must never panic, and every frame that decodes must
//! survive an encode/decode round trip unchanged (same type, request id and body value).
#![no_main]

use bytes::BytesMut;
use chime_protocol::{ClientFrame, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoder = FrameDecoder::default();
    let mut buf = BytesMut::from(data);
    // A fatal (length) error ends the stream, as it ends a connection.
    while let Ok(Some(raw)) = decoder.decode(&mut buf) {
        if let Ok(frame) = ClientFrame::decode(&raw) {
            // The decoder admits at most MAX_FRAME, and a re-encoding is never longer than what
            // decoded, so the encoder cannot refuse it.
            let encoded = frame.encode(raw.request_id).expect("a decoded frame re-encodes");
            let mut again = BytesMut::from(&encoded[..]);
            let reraw = decoder.decode(&mut again).ok().flatten();
            assert!(again.is_empty(), "the re-encoding is exactly one frame");
            assert_eq!(reraw.as_ref().map(|r| (r.ty, r.request_id)), Some((raw.ty, raw.request_id)));
            assert_eq!(reraw.as_ref().map(ClientFrame::decode), Some(Ok(frame)), "frame did not round-trip");
        }
    }
});
