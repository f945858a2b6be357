//! The daemon's SYNC state machine (`chimed::sync::SyncState`) driven the way the event loop
//! drives it, by an arbitrary sequence of commits, publishes, SYNCs, fetch reads and results
//! (pages, failures, not-member), joins, leaves, logouts and logins, for three rooms and one
//! connection. Every frame it sends is decoded by a client that checks the machine's promise: per
//! room, the deltas received (pages, then pushes) continue the client's cursor with no gap, no
//! duplicate and in seq order; every SYNC is answered, with heads equal to what was delivered; and
//! once everything settles, every subscribed room was delivered up to its head. What exactly is
//! modelled and checked: `chime_fuzz::sync_model`.
#![no_main]

use chime_fuzz::sync_model::{self, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|ops: Vec<Op>| sync_model::run(&ops));
