//! Checks shared by Chime's fuzz targets (`fuzz_targets/`, one small file per target; see
//! docs/fuzzing.md for how to run them and what each found).
//!
//! - [`bodies`]: decoding any body bytes as any frame type, for either direction.
//! - [`sync_model`]: the event loop and a checking client around the daemon's SYNC state machine.
#![deny(missing_docs)]

pub mod bodies;
pub mod sync_model;
