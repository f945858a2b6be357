//! The `chime` terminal client as a library: the command line, the commands, their output, and
//! the reconnecting `tail`. The binary (`main.rs`) only parses the arguments, runs
//! [`commands::run`] and turns the outcome into an exit code.
//!
//! Everything that talks to a server is `chime-client`'s: the blocking client, its session
//! (which does `tail`'s duplicate dropping and gap filling), trust-on-first-use pinning, the home
//! directory and the backoff. What is left here is what makes `chime` this program: the commands
//! of `../shared/interface.md`, their human and JSON output, password prompts, and the retry and
//! reconnect policies. Being a library lets other front ends and tests reuse those pieces; the
//! interface that counts remains the command line.

pub mod cli;
pub mod commands;
pub mod connect;
pub mod output;
pub mod password;
pub mod tail;
