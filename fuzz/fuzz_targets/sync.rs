//! The daemon's SYNC state machine (`chimed::sync::SyncState`) driven the way the event loop
//! drives it, by an arbitrary sequence of commits, publishes, SYNCs, fetch reads and results
//! (pages, failures, not-member; current or replaced), deferred and retried fetches, joins,
//! leaves, logouts and logins, for three rooms and one connection. Every frame it sends is decoded
//! by a client that checks the machine's promise: per room, the deltas received (pages, then
//! pushes) continue the client's cursor with no gap, no duplicate and in seq order, with no push
//! between a SYNC's pages and none lost to a failed fetch; every SYNC is answered (SYNC_DONE, or an
//! ERROR with its request id), with heads equal to what was delivered; and once everything
//! settles, every subscribed room was delivered up to its head. What exactly is modelled and
//! checked: `chime_fuzz::sync_model`.
#![no_main]

use chime_fuzz::sync_model::{self, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|ops: Vec<Op>| sync_model::run(&ops));
