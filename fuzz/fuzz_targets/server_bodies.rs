//! Server frame bodies, as a client decodes them from a hostile server: the input is a type code
//! (two bytes, big-endian) and a body. Decoding it must never panic, must agree with the server
//! code table (codes `0x8000` and up), must reject trailing bytes, a body that decodes must
//! re-encode to the same bytes (or, for a non-shortest varint, to shorter bytes with the same
//! value), and `FrameType::is_push` must hold for exactly DELTA, GOODBYE, SETTING_CHANGED, READ_STATE_CHANGED, TYPING_NOW, PRESENCE_CHANGED and UNREAD_AT_LOGIN, the
//! frames a client never takes as the reply to a request. See `chime_fuzz::bodies`.
#![no_main]

use chime_fuzz::bodies;
use chime_protocol::ServerFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| bodies::check::<ServerFrame>(data));
