//! Storage nodes: machines the daemon moves cold files to, reached only through the system's
//! OpenSSH client (so ProxyJump, reverse tunnels and `~/.ssh/config` work as the operator set them
//! up). On each node runs `chimed node --root DIR`, the agent, speaking a small framed protocol on
//! its stdin and stdout; the daemon keeps one ssh session per node and multiplexes its transfers
//! over it. docs/nodes.md describes the protocol byte for byte and how to set a node up.
//!
//! - [`proto`]: the frames, their codec and the limits; pure, no I/O.
//! - [`store`]: the node's content-addressed object store on disk: an object exists only complete
//!   and verified (temp file, hash check, fsync, rename, directory fsync).
//! - [`agent`]: `chimed node`: serves the protocol over a store, with file I/O on transfer threads
//!   so a slow transfer does not hold up small requests.
//! - [`link`]: [`NodeLink`], the daemon's side of one node: one ssh session shared by many
//!   threads, deadlines on every wait, reopened with backoff; calls fail with errors that say
//!   whether a retry can succeed.
//! - [`nodes`]: [`Nodes`], the configured set, and [`nodes::rank`], the pure rule that picks a
//!   node for a new file (priority, free space, measured speed).
//! - [`admin`]: what `chimed admin nodes` and `chimed admin verify` print.

pub mod admin;
pub mod agent;
pub mod link;
pub mod nodes;
pub mod proto;
pub mod store;

pub use link::{LinkOptions, NodeError, NodeLink, PutReceipt, Reachability, VerifyReport};
pub use nodes::{NodeFacts, Nodes};
pub use proto::{Sha256, Space};
