//! Storage-node frames (the protocol of `chimed node`, both directions): the input is a byte
//! stream, as the agent reads it from ssh or the daemon's link reads it back. `read_frame` splits
//! it without panicking and refuses a length over the maximum before reading the body; every frame
//! is decoded both as a client frame and as an agent frame, and whatever decodes re-encodes to one
//! frame that decodes to the same value and id.
#![no_main]

use chimed::node::proto::{read_frame, Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    while let Ok(Some(raw)) = read_frame(&mut input) {
        let id = raw.id;
        if let Ok(request) = Request::decode(raw.clone()) {
            let encoded = request.encode(id);
            let again = read_frame(&mut &encoded[..]).expect("an encoded request reads").expect("one frame");
            assert_eq!(again.id, id);
            assert_eq!(Request::decode(again).as_ref(), Ok(&request));
        }
        if let Ok(reply) = Reply::decode(raw) {
            let encoded = reply.encode(id);
            let again = read_frame(&mut &encoded[..]).expect("an encoded reply reads").expect("one frame");
            assert_eq!(again.id, id);
            assert_eq!(Reply::decode(again).as_ref(), Ok(&reply));
        }
    }
});
