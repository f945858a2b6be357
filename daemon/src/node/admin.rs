//! What `chimed admin nodes` and `chimed admin verify NODE` do and print.
//!
//! Both write either lines for people or, with `--json`, one JSON object per line and nothing
//! else on stdout. `nodes` asks every node at once, so one unreachable node costs one timeout,
//! not one per node.

use super::link::{NodeError, NodeLink};
use super::nodes::Nodes;
use super::proto::{Space, Welcome};
use serde_json::json;
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// One node's answer to `admin nodes`.
#[derive(Debug)]
pub struct NodeStatus {
    /// The configured name.
    pub name: String,
    /// The configured ssh destination.
    pub ssh: String,
    /// What the agent said and the node's space, or why it could not be asked.
    pub result: Result<(Welcome, Space), NodeError>,
    /// How long connecting and asking took.
    pub elapsed: Duration,
    /// Files the daemon recorded on this node and their bytes (from its placements), if known.
    pub placed: Option<(u64, u64)>,
}

impl NodeStatus {
    /// Connects to the node (if needed) and asks for its space.
    pub fn query(link: &NodeLink, ssh: &str) -> NodeStatus {
        let started = Instant::now();
        let result = link.connect().and_then(|welcome| Ok((welcome, link.space()?)));
        NodeStatus { name: link.name().into(), ssh: ssh.into(), result, elapsed: started.elapsed(), placed: None }
    }

    /// The `--json` line.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = self.to_json_without_files();
        if let (Some((files, bytes)), Some(map)) = (self.placed, value.as_object_mut()) {
            map.insert("files".into(), json!(files));
            map.insert("file_bytes".into(), json!(bytes));
        }
        value
    }

    fn to_json_without_files(&self) -> serde_json::Value {
        match &self.result {
            Ok((welcome, space)) => json!({
                "node": self.name,
                "reachable": true,
                "used": space.used,
                "free": space.free,
                "total": space.total,
                "objects": space.objects,
                "host": welcome.host,
                "root": welcome.root,
                "agent_version": welcome.agent_version,
                "ms": self.elapsed.as_millis() as u64,
            }),
            Err(e) => json!({
                "node": self.name,
                "reachable": false,
                "error": e.to_string(),
                "ms": self.elapsed.as_millis() as u64,
            }),
        }
    }

    /// The line for people.
    pub fn to_line(&self) -> String {
        match &self.result {
            Ok((welcome, space)) => format!(
                "{}  up    {} used, {} free of {}, {} objects{}  ({}:{}, chimed {}, {} ms)",
                self.name,
                human_bytes(space.used),
                human_bytes(space.free),
                human_bytes(space.total),
                space.objects,
                self.placed.map_or(String::new(), |(files, bytes)| format!(", {files} files ({})", human_bytes(bytes))),
                welcome.host,
                welcome.root,
                welcome.agent_version,
                self.elapsed.as_millis()
            ),
            Err(e) => format!("{}  DOWN  {e}", self.name),
        }
    }
}

/// Every node's status, asked all at once, in configuration order.
pub fn status_all(nodes: &Nodes, destinations: &[String]) -> Vec<NodeStatus> {
    std::thread::scope(|scope| {
        let asked: Vec<_> = nodes
            .links()
            .iter()
            .zip(destinations)
            .map(|(link, ssh)| scope.spawn(move || NodeStatus::query(link, ssh)))
            .collect();
        asked
            .into_iter()
            .zip(nodes.links())
            .map(|(thread, link)| {
                thread.join().unwrap_or_else(|_| NodeStatus {
                    name: link.name().into(),
                    ssh: String::new(),
                    result: Err(NodeError::Protocol { node: link.name().into(), message: "the query panicked".into() }),
                    elapsed: Duration::ZERO,
                    placed: None,
                })
            })
            .collect()
    })
}

/// `chimed admin nodes`: prints every node's status, with the files the daemon placed there
/// (`placed`: node, files, bytes; empty when the cache has no index); `Ok(false)` when any is unreachable.
pub fn print_nodes(
    nodes: &Nodes,
    destinations: &[String],
    placed: &[(String, u64, u64)],
    json: bool,
    out: &mut dyn Write,
) -> io::Result<bool> {
    let mut statuses = status_all(nodes, destinations);
    for status in statuses.iter_mut().filter(|_| !placed.is_empty()) {
        let counted = placed.iter().find(|(node, _, _)| *node == status.name).map(|&(_, files, bytes)| (files, bytes));
        // A node with no record has no files, as far as the daemon knows.
        status.placed = Some(counted.unwrap_or((0, 0)));
    }
    for status in &statuses {
        if json {
            writeln!(out, "{}", status.to_json())?;
        } else {
            writeln!(out, "{}", status.to_line())?;
        }
    }
    out.flush()?;
    Ok(statuses.iter().all(|s| s.result.is_ok()))
}

/// `chimed admin verify NODE`: re-hashes every object on the node, printing each bad one as
/// the node reports it, then a summary; returns the number of bad objects.
pub fn print_verify(link: &NodeLink, json: bool, out: &mut dyn Write) -> Result<u64, VerifyError> {
    let node = link.name().to_owned();
    let mut written = Ok(());
    let (checked, bad) = link.verify_each(None, &mut |object| {
        if written.is_err() {
            return;
        }
        written = if json {
            let line = json!({
                "node": node,
                "sha256": object.sha256.to_hex(),
                "problem": object.kind.to_string().to_lowercase(),
                "detail": object.detail,
            });
            writeln!(out, "{line}")
        } else {
            writeln!(out, "BAD {} {}: {}", object.sha256, object.kind.to_string().to_lowercase(), object.detail)
        };
    })?;
    written?;
    if json {
        writeln!(out, "{}", json!({ "node": node, "checked": checked, "bad": bad }))?;
    } else {
        writeln!(out, "{node}: {checked} objects checked, {bad} bad")?;
    }
    out.flush()?;
    Ok(bad)
}

/// Why `admin verify` could not finish.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The node could not be asked.
    #[error("{0}")]
    Node(#[from] NodeError),
    /// stdout failed.
    #[error("writing the report: {0}")]
    Output(#[from] io::Error),
}

/// Bytes in binary units with one decimal: `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn an_unreachable_node_prints_why() {
        let status = NodeStatus {
            name: "n2".into(),
            ssh: "h".into(),
            result: Err(NodeError::Unreachable { node: "n2".into(), reason: "Connection refused".into() }),
            elapsed: Duration::from_millis(12),
            placed: None,
        };
        let json = status.to_json();
        assert_eq!(json["reachable"], false);
        assert!(json["error"].as_str().is_some_and(|e| e.contains("Connection refused")));
        assert!(status.to_line().starts_with("n2  DOWN  node n2 is unreachable: Connection refused"));
    }
}
