//! [`Nodes`]: the configured storage nodes, and the choice of where a file goes.
//!
//! The choice is a pure function, [`rank`], over what the links last learned about their nodes
//! ([`NodeFacts`]); it does no I/O, so callers decide when to pay for fresh numbers
//! ([`Nodes::refresh`]) and the rule is tested on its own. The rule:
//!
//! 1. A node is **eligible** when it is not known to be down, its space is known, and the file
//!    fits while leaving 1% of the node's filesystem free (a full disk fails more than our writes).
//! 2. **Priority** first: an operator's preference is never outweighed by numbers; among eligible
//!    nodes, a higher `priority` always ranks first.
//! 3. Among equal priorities, the **score** `log2(free bytes after the file) + 0.5 x log2(speed
//!    in bytes/s)`: doubling a node's free space is worth as much as quadrupling its speed. Space
//!    is what runs out, and logarithms keep a huge node from taking every file until it is as
//!    full as the rest; speed decides only how long moves take. A node with no measured speed
//!    counts at the median speed of those measured (1 byte/s, i.e. no term, when none are).
//! 4. Ties keep the configuration's order.

use super::link::{LinkOptions, NodeError, NodeLink, Reachability};
use super::proto::Space;
use crate::config::Config;

/// What [`rank`] weighs about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFacts {
    /// The configured priority.
    pub priority: i32,
    /// `false` when the last attempt to reach it failed.
    pub reachable: bool,
    /// Its space, if known.
    pub space: Option<Space>,
    /// Measured speed of recent transfers, bytes per second.
    pub speed: Option<f64>,
}

/// Bytes a node keeps free whatever is stored: 1% of its filesystem.
pub fn reserve(total: u64) -> u64 {
    total / 100
}

/// The eligible nodes for a file of `size` bytes, best first, as indexes into `facts` (see the
/// module doc for the rule).
pub fn rank(facts: &[NodeFacts], size: u64) -> Vec<usize> {
    let room_after = |f: &NodeFacts| -> Option<u64> {
        let space = f.space.filter(|_| f.reachable)?;
        space.free.checked_sub(size)?.checked_sub(reserve(space.total))?;
        Some(space.free - size)
    };
    let eligible: Vec<(usize, u64)> =
        facts.iter().enumerate().filter_map(|(i, f)| room_after(f).map(|room| (i, room))).collect();
    let mut speeds: Vec<f64> =
        eligible.iter().filter_map(|&(i, _)| facts[i].speed).filter(|s| s.is_finite() && *s > 0.0).collect();
    speeds.sort_by(f64::total_cmp);
    let median = speeds.get(speeds.len() / 2).copied().unwrap_or(1.0);
    let mut scored: Vec<(usize, i32, f64)> = eligible
        .into_iter()
        .map(|(i, room)| {
            let speed = facts[i].speed.filter(|s| s.is_finite() && *s > 0.0).unwrap_or(median);
            let score = (room.max(1) as f64).log2() + 0.5 * speed.log2();
            (i, facts[i].priority, score)
        })
        .collect();
    // Stable: equal priority and score keep the configuration's order.
    scored.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)));
    scored.into_iter().map(|(i, _, _)| i).collect()
}

/// The configured nodes, one [`NodeLink`] each.
#[derive(Debug, Clone)]
pub struct Nodes {
    links: Vec<NodeLink>,
    copies: usize,
}

impl Nodes {
    /// Links to every `[[node]]` of the configuration (nothing is started until used).
    pub fn from_config(config: &Config, options: &LinkOptions) -> Nodes {
        let links = config.node.iter().map(|node| NodeLink::new(node, options.clone())).collect();
        Nodes::new(links, config.files.copies as usize)
    }

    /// A set of links; each file should live on `copies` of them.
    pub fn new(links: Vec<NodeLink>, copies: usize) -> Nodes {
        Nodes { links, copies: copies.max(1) }
    }

    /// Every link, in configuration order.
    pub fn links(&self) -> &[NodeLink] {
        &self.links
    }

    /// The link to the node named `name`.
    pub fn get(&self, name: &str) -> Option<&NodeLink> {
        self.links.iter().find(|link| link.name() == name)
    }

    /// On how many nodes each file should be kept.
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// Whether no node is configured.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Asks every node for its space, all at once, and returns the answers in configuration
    /// order. Each link remembers its answer for [`Nodes::choose`].
    pub fn refresh(&self) -> Vec<Result<Space, NodeError>> {
        std::thread::scope(|scope| {
            let asked: Vec<_> = self.links.iter().map(|link| scope.spawn(move || link.space())).collect();
            asked
                .into_iter()
                .zip(&self.links)
                .map(|(thread, link)| {
                    thread.join().unwrap_or_else(|_| {
                        Err(NodeError::Protocol { node: link.name().into(), message: "the query panicked".into() })
                    })
                })
                .collect()
        })
    }

    /// What the links know now (no I/O).
    pub fn facts(&self) -> Vec<NodeFacts> {
        self.links
            .iter()
            .map(|link| NodeFacts {
                priority: link.priority(),
                reachable: !matches!(link.reachability(), Reachability::Down { .. }),
                space: link.last_space(),
                speed: link.speed(),
            })
            .collect()
    }

    /// The nodes a new file of `size` bytes may go to, best first, leaving out those named in
    /// `exclude` (the ones that already have it). Uses what the links last learned; call
    /// [`Nodes::refresh`] first for fresh numbers.
    pub fn choose(&self, size: u64, exclude: &[&str]) -> Vec<&NodeLink> {
        let facts = self.facts();
        rank(&facts, size).into_iter().map(|i| &self.links[i]).filter(|link| !exclude.contains(&link.name())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MB: f64 = 1e6;

    fn node(priority: i32, free_gib: u64, speed: Option<f64>) -> NodeFacts {
        NodeFacts {
            priority,
            reachable: true,
            space: Some(Space { used: 0, objects: 0, free: free_gib * GIB, total: 1000 * GIB }),
            speed,
        }
    }

    #[test]
    fn priority_comes_first() {
        let facts = [node(0, 900, Some(100.0 * MB)), node(1, 20, Some(MB))];
        assert_eq!(rank(&facts, GIB), [1, 0]);
    }

    #[test]
    fn free_space_counts_twice_as_much_as_speed() {
        // Same speed: more room wins.
        assert_eq!(rank(&[node(0, 100, Some(MB)), node(0, 200, Some(MB))], GIB), [1, 0]);
        // 4x the speed beats less than 2x the room...
        assert_eq!(rank(&[node(0, 150, Some(10.0 * MB)), node(0, 100, Some(40.0 * MB))], 0), [1, 0]);
        // ...but not 3x the room.
        assert_eq!(rank(&[node(0, 300, Some(10.0 * MB)), node(0, 100, Some(40.0 * MB))], 0), [0, 1]);
    }

    #[test]
    fn an_unmeasured_node_counts_at_the_median_speed() {
        let facts = [node(0, 100, Some(10.0 * MB)), node(0, 100, None), node(0, 100, Some(40.0 * MB))];
        // The unmeasured node ties with the median (40 MB/s here: the upper of the two), and
        // ties keep the configured order.
        assert_eq!(rank(&facts, 0), [1, 2, 0]);
        // Nobody measured: space alone decides, then order.
        assert_eq!(rank(&[node(0, 100, None), node(0, 100, None), node(0, 101, None)], 0), [2, 0, 1]);
    }

    #[test]
    fn down_unknown_and_full_nodes_are_not_eligible() {
        let down = NodeFacts { reachable: false, ..node(5, 500, None) };
        let unknown = NodeFacts { space: None, ..node(5, 500, None) };
        // 10 GiB free of 1000: the file fits only by eating into the 1% reserve.
        let nearly_full = node(5, 10, None);
        let fine = node(0, 50, None);
        let facts = [down, unknown, nearly_full, fine];
        assert_eq!(rank(&facts, GIB), [3]);
        assert_eq!(rank(&facts, 100 * GIB), Vec::<usize>::new());
        assert_eq!(rank(&[], 1), Vec::<usize>::new());
    }

    #[test]
    fn nodes_from_config_keep_order_names_and_copies() {
        let config = Config {
            node: ["a", "b"]
                .iter()
                .map(|name| crate::config::NodeConfig {
                    name: (*name).into(),
                    ssh: "h".into(),
                    ssh_options: vec![],
                    root: "/r".into(),
                    agent: "chimed".into(),
                    priority: 0,
                })
                .collect(),
            files: crate::config::FilesConfig { copies: 2, ..Default::default() },
            ..Config::default()
        };
        let nodes = Nodes::from_config(&config, &LinkOptions::default());
        assert_eq!(nodes.links().iter().map(NodeLink::name).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(nodes.copies(), 2);
        assert!(nodes.get("b").is_some() && nodes.get("c").is_none());
        // Nothing is known before a refresh, so nothing is chosen.
        assert!(nodes.choose(1, &[]).is_empty());
    }
}
