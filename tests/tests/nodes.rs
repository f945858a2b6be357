//! Storage nodes end to end: the daemon's `NodeLink` driving real `chimed node` agents through a
//! real `ssh` to a throwaway `sshd` on loopback ([`chime_tests::sshd`]), the `chimed admin`
//! commands through the binary, and the agent fed garbage directly. Needs `cargo build -p chimed`
//! first (the agent is `target/debug/chimed`); `CHIME_SKIP_SSH=1` skips the tests that need sshd.

#[path = "nodes/util.rs"]
mod util;

#[path = "nodes/admin.rs"]
mod admin;
#[path = "nodes/agent.rs"]
mod agent;
#[path = "nodes/failures.rs"]
mod failures;
#[path = "nodes/transfers.rs"]
mod transfers;
