//! Chime's cross-crate test support: a harness that runs a real `chimed` ([`daemon`]), the
//! building blocks of the `chime-load` load generator ([`load`]), and (in `postgres`) a throwaway
//! PostgreSQL server.
#![deny(missing_docs)]

pub mod daemon;
pub mod load;
