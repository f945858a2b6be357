//! Chime's cross-crate test support: a harness that runs a real `chimed` ([`daemon`]), a
//! throwaway PostgreSQL server ([`postgres`]), a throwaway OpenSSH server for storage nodes
//! ([`sshd`]), bulk test data written straight into a daemon's
//! database ([`seed`]), and the building blocks of the `chime-load` load generator ([`load`]).
#![deny(missing_docs)]

pub mod daemon;
pub mod load;
pub mod postgres;
pub mod seed;
pub mod sshd;
