//! Client frame bodies, as the server decodes them: the input is a type code (two bytes,
//! big-endian) and a body. Decoding it must never panic, must agree with the client code table
//! (codes below `0x8000`; any other code is `UnknownType`), must reject trailing bytes, and a body
//! that decodes must re-encode to the same bytes, or (a non-shortest varint) to shorter bytes that
//! decode to the same value. See `chime_fuzz::bodies`.
#![no_main]

use chime_fuzz::bodies;
use chime_protocol::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| bodies::check::<ClientFrame>(data));
