//! VERIFY finding damage, and `chimed admin nodes|verify` run through the binary against a
//! config file.

use crate::util::{node, object_path, random_file, TestNode};
use chime_tests::daemon::binary;
use chime_tests::sshd::Sshd;
use chimed::config::NodeConfig;
use chimed::node::proto::BadKind;
use chimed::node::{NodeError, Sha256};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// A config file with one `[[node]]` per entry.
fn write_config(path: &Path, nodes: &[&NodeConfig]) {
    let mut text = String::new();
    for node in nodes {
        let options: Vec<String> = node.ssh_options.iter().map(|o| format!("{o:?}")).collect();
        text.push_str(&format!(
            "[[node]]\nname = {:?}\nssh = {:?}\nssh_options = [{}]\nroot = {:?}\nagent = {:?}\n\n",
            node.name,
            node.ssh,
            options.join(", "),
            node.root,
            node.agent
        ));
    }
    std::fs::write(path, text).expect("write config");
}

/// Runs `chimed admin ARGS...`, bounded in time by the command's own `--timeout`.
fn admin(args: &[&str]) -> Output {
    Command::new(binary("chimed"))
        .arg("admin")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run chimed admin")
}

fn json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}")))
        .collect()
}

fn put_some(n: &TestNode, dir: &Path, count: u64) -> Vec<Sha256> {
    (0..count)
        .map(|i| {
            let (path, sha) = random_file(dir, &format!("{}-{i}", n.config.name), 10_000 + i, 500 + i);
            n.link.put(&path, sha, 10_000 + i).expect("put");
            sha
        })
        .collect()
}

#[test]
fn verify_finds_a_flipped_byte_and_admin_verify_reports_it() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd, dir.path(), "n1");
    let n2 = node(&sshd, dir.path(), "n2");
    let shas = put_some(&n1, dir.path(), 3);
    put_some(&n2, dir.path(), 1);
    let damaged = shas[1];
    let path = object_path(&n1.root, &damaged);
    let mut bytes = std::fs::read(&path).expect("read object");
    bytes[5000] ^= 0x20;
    std::fs::write(&path, &bytes).expect("damage");

    let report = n1.link.verify(None).expect("verify");
    assert_eq!((report.checked, report.bad_total), (3, 1));
    assert_eq!(report.bad[0].sha256, damaged);
    assert_eq!(report.bad[0].kind, BadKind::MISMATCH);
    assert_eq!(report.bad[0].detail, Sha256::digest(&bytes).to_hex());
    assert_eq!(n1.link.verify(Some(shas[0])).expect("verify one").bad_total, 0);
    assert_eq!(n1.link.verify(Some(damaged)).expect("verify one").bad_total, 1);
    // A whole-object GET checks the hash too: the damaged copy is not passed off as good.
    let err = n1.link.get(damaged, 0, None, &mut Vec::new()).expect_err("damaged");
    assert!(matches!(err, NodeError::Corrupt { .. }), "{err}");
    assert!(!err.is_retryable(), "another node's copy, not this one again");

    let config = dir.path().join("chimed.toml");
    write_config(&config, &[&n1.config, &n2.config]);
    let config = config.to_str().expect("utf-8 path");
    let output = admin(&["verify", "n1", "--config", config, "--json"]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "bad objects: exit 1; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["sha256"], damaged.to_hex());
    assert_eq!(lines[0]["problem"], "mismatch");
    assert_eq!((lines[1]["checked"].as_u64(), lines[1]["bad"].as_u64()), (Some(3), Some(1)));

    let output = admin(&["verify", "n2", "--config", config]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "n2: 1 objects checked, 0 bad");

    let output = admin(&["verify", "n9", "--config", config]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no node named \"n9\""));
}

#[test]
fn admin_nodes_prints_every_node_as_json() {
    let Some(sshd) = Sshd::start_or_skip() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = node(&sshd, dir.path(), "n1");
    let n2 = node(&sshd, dir.path(), "n2");
    put_some(&n1, dir.path(), 2);
    let config = dir.path().join("chimed.toml");
    write_config(&config, &[&n1.config, &n2.config]);
    let config_arg = config.to_str().expect("utf-8 path");

    let output = admin(&["nodes", "--config", config_arg, "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["node"], "n1");
    assert_eq!(lines[1]["node"], "n2");
    for line in &lines {
        assert_eq!(line["reachable"], true, "{line}");
        assert!(line["free"].as_u64().is_some_and(|free| free > 0), "{line}");
        assert!(line["total"].as_u64() >= line["free"].as_u64(), "{line}");
    }
    assert_eq!((lines[0]["objects"].as_u64(), lines[0]["used"].as_u64()), (Some(2), Some(10_000 + 10_001)));
    assert_eq!(lines[1]["objects"].as_u64(), Some(0));

    let output = admin(&["nodes", "--config", config_arg]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.lines().next().is_some_and(|l| l.starts_with("n1  up ")), "{text}");

    // A third node nobody listens for: reported down with ssh's reason, and exit 1.
    let mut gone = sshd.node("gone", &dir.path().join("gone"));
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    gone.ssh = "127.0.0.1".into();
    gone.ssh_options = vec!["-F".into(), "/dev/null".into(), "-p".into(), closed_port.to_string()];
    write_config(&config, &[&n1.config, &n2.config, &gone]);
    let output = admin(&["nodes", "--config", config_arg, "--json", "--timeout", "5"]);
    assert_eq!(output.status.code(), Some(1));
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 3);
    assert_eq!((&lines[0]["reachable"], &lines[2]["reachable"]), (&Value::Bool(true), &Value::Bool(false)));
    assert!(lines[2]["error"].as_str().is_some_and(|e| e.contains("Connection refused")), "{}", lines[2]);
}
