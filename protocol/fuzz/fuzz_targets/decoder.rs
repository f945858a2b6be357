//! Fuzzes the server's side of the frame decoder: any bytes a client can send, split into frames
//! and decoded as client frames, must never panic, and every frame that decodes must survive an
//! encode/decode round trip unchanged.
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
            let mut again = BytesMut::from(&frame.encode(raw.request_id)[..]);
            let reraw = decoder.decode(&mut again).ok().flatten();
            let redecoded = reraw.as_ref().map(ClientFrame::decode);
            assert_eq!(redecoded, Some(Ok(frame)), "frame did not round-trip");
        }
    }
});
