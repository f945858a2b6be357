//! A real, throwaway OpenSSH server on loopback, for tests of storage nodes.
//!
//! [`Sshd::start`] makes a host key and a user key with `ssh-keygen` in a temporary directory,
//! writes an `sshd_config` (127.0.0.1 only, a free port, keys from the directory only, no
//! passwords, no PAM, our user only), starts `/usr/sbin/sshd -D -e -f CONFIG` and waits until the
//! port answers with an SSH banner. It also writes the client's side: an `ssh_config` with a Host
//! alias (used with `-F`, so nothing of the user's own `~/.ssh` is read) and a `known_hosts` that
//! already holds the host key, so the client checks the server strictly and never prompts.
//! Dropping it kills sshd and every process it forked (sessions, agents), then removes the
//! directory.
//!
//! As root (CI), sshd needs its privilege-separation directory `/run/sshd`, created here if
//! missing, and root logs in with its key (`PermitRootLogin prohibit-password`). As a normal
//! user, sshd runs unprivileged and can only log that same user in, which is all tests need.
//!
//! Missing OpenSSH binaries fail the tests that need them with what to install; set
//! `CHIME_SKIP_SSH=1` to skip those tests instead.

use anyhow::{bail, Context, Result};
use chimed::config::NodeConfig;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable that, set to `1`, skips the tests that need sshd.
pub const SKIP_ENV: &str = "CHIME_SKIP_SSH";

/// Where Debian and most distributions install sshd (it must be started by absolute path).
pub const SSHD: &str = "/usr/sbin/sshd";

/// The Host alias the generated ssh_config defines.
pub const ALIAS: &str = "chime-test-node";

/// How long sshd may take to answer on its port.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running throwaway sshd.
pub struct Sshd {
    /// Keys, configs, log; removed on drop.
    dir: tempfile::TempDir,
    /// The listening sshd, while running.
    child: Option<Child>,
    /// Its loopback port.
    port: u16,
    /// The user tests log in as (the current one).
    user: String,
}

/// Whether `CHIME_SKIP_SSH=1` asks to skip the sshd tests.
pub fn skip_requested() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|v| v == "1")
}

impl Sshd {
    /// Starts a server, or returns `None` when `CHIME_SKIP_SSH=1`. Panics with the reason (and
    /// what to install) when it cannot start otherwise, so a machine without sshd fails loudly
    /// rather than passing without testing anything.
    pub fn start_or_skip() -> Option<Sshd> {
        if skip_requested() {
            eprintln!("{SKIP_ENV}=1: skipping a test that needs sshd");
            return None;
        }
        match Sshd::start() {
            Ok(sshd) => Some(sshd),
            Err(e) => panic!(
                "cannot start a throwaway sshd: {e:#}\nInstall OpenSSH (`apt-get install openssh-server \
                 openssh-client`), or set {SKIP_ENV}=1 to skip these tests."
            ),
        }
    }

    /// Generates keys and configs in a new temporary directory and starts sshd on a free port.
    pub fn start() -> Result<Sshd> {
        if !Path::new(SSHD).is_file() {
            bail!("{SSHD} not found");
        }
        let dir = tempfile::Builder::new().prefix("chime-sshd-").tempdir().context("creating a temp dir")?;
        let user = current_user()?;
        keygen(&dir.path().join("host_ed25519"))?;
        keygen(&dir.path().join("id_ed25519"))?;
        fs::copy(dir.path().join("id_ed25519.pub"), dir.path().join("authorized_keys"))
            .context("writing authorized_keys")?;
        if is_root() {
            // sshd's privilege-separated child chroots here; a fresh container lacks it.
            fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        }
        let mut sshd = Sshd { dir, child: None, port: 0, user };
        // The port is picked, then released, then bound by sshd: someone may take it in between.
        let mut last_error = None;
        for _ in 0..3 {
            sshd.port = free_port()?;
            match sshd.spawn_and_wait() {
                Ok(()) => return Ok(sshd),
                Err(e) => {
                    sshd.kill_all();
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let dir = self.dir.path();
        fs::write(dir.join("sshd_config"), self.sshd_config()?).context("writing sshd_config")?;
        fs::write(dir.join("ssh_config"), self.ssh_config_text()).context("writing ssh_config")?;
        let host_key = fs::read_to_string(dir.join("host_ed25519.pub")).context("reading the host key")?;
        let mut fields = host_key.split_whitespace();
        let (Some(kind), Some(key)) = (fields.next(), fields.next()) else { bail!("unexpected host key {host_key:?}") };
        fs::write(dir.join("known_hosts"), format!("[127.0.0.1]:{} {kind} {key}\n", self.port))
            .context("writing known_hosts")?;
        let log = fs::File::create(dir.join("sshd.log")).context("creating sshd.log")?;
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting sshd")?;
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!("sshd exited with {status}: {}", self.log().trim());
                }
            }
            if banner(addr).is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("sshd did not answer on {addr} within {READY_TIMEOUT:?}: {}", self.log().trim());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sshd_config(&self) -> Result<String> {
        let dir = self.dir.path().display();
        // Without PAM, sshd refuses a user whose password is locked ('!' in /etc/shadow); PAM's
        // account check does not. Root in containers usually has '*', which is not locked.
        let use_pam = if password_locked(&self.user) { "yes" } else { "no" };
        Ok(format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {dir}/host_ed25519\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             AllowUsers {user}\n\
             StrictModes no\n\
             UsePAM {use_pam}\n\
             PrintMotd no\n\
             X11Forwarding no\n\
             AllowTcpForwarding no\n\
             MaxStartups 100\n\
             MaxSessions 100\n\
             LogLevel INFO\n",
            port = self.port,
            user = self.user,
        ))
    }

    fn ssh_config_text(&self) -> String {
        let dir = self.dir.path().display();
        format!(
            "Host {ALIAS}\n\
             \x20 HostName 127.0.0.1\n\
             \x20 Port {port}\n\
             \x20 User {user}\n\
             \x20 IdentityFile {dir}/id_ed25519\n\
             \x20 IdentitiesOnly yes\n\
             \x20 UserKnownHostsFile {dir}/known_hosts\n\
             \x20 GlobalKnownHostsFile /dev/null\n\
             \x20 StrictHostKeyChecking yes\n\
             \x20 LogLevel ERROR\n",
            port = self.port,
            user = self.user,
        )
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user the client logs in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The directory holding the keys and configs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// ssh options that make [`ALIAS`] reach this server: `-F ssh_config`.
    pub fn alias_options(&self) -> Vec<String> {
        vec!["-F".into(), self.dir.path().join("ssh_config").display().to_string()]
    }

    /// This server as an `ssh://` destination, for use with [`Sshd::url_options`].
    pub fn url(&self) -> String {
        format!("ssh://{}@127.0.0.1:{}", self.user, self.port)
    }

    /// ssh options for [`Sshd::url`]: no config file, the key and known_hosts given directly.
    pub fn url_options(&self) -> Vec<String> {
        let dir = self.dir.path();
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            dir.join("id_ed25519").display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", dir.join("known_hosts").display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// A `[[node]]` reaching this server through the Host alias, whose agent is the freshly
    /// built `target/debug/chimed` and whose store is at `root`.
    pub fn node(&self, name: &str, root: &Path) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            ssh: ALIAS.into(),
            ssh_options: self.alias_options(),
            root: root.display().to_string(),
            agent: agent_path().display().to_string(),
            priority: 0,
        }
    }

    /// Like [`Sshd::node`], through the `ssh://user@127.0.0.1:PORT` destination instead.
    pub fn node_by_url(&self, name: &str, root: &Path) -> NodeConfig {
        NodeConfig { ssh: self.url(), ssh_options: self.url_options(), ..self.node(name, root) }
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Kills sshd and every process it forked (the sessions and what they run): the node is
    /// gone, as far as anyone connecting is concerned.
    pub fn stop(&mut self) {
        self.kill_all();
    }

    /// Starts sshd again on the same port, keys and configs after [`Sshd::stop`]: the node is
    /// back at the address the daemon knows (a node that was rebooted, say).
    pub fn restart(&mut self) -> Result<()> {
        self.kill_all();
        self.spawn_and_wait()
    }

    fn kill_all(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Children first, so none is re-parented out of reach while the listener dies.
            for pid in descendants(child.id()) {
                kill9(pid);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- sshd log ---\n{}--- end of sshd log ---", self.log());
        }
        self.kill_all();
    }
}

/// The agent command for test nodes: the absolute path of the built `chimed`.
pub fn agent_path() -> PathBuf {
    let path = crate::daemon::binary("chimed");
    fs::canonicalize(&path).unwrap_or(path)
}

/// Process ids of the `chimed node` agents serving `root` (found through /proc).
pub fn agent_pids(root: &Path) -> Vec<u32> {
    let root = root.display().to_string();
    processes()
        .into_iter()
        .filter(|&(pid, _)| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2).any(|w| w[0] == b"--root" && w[1] == root.as_bytes()) && args.iter().any(|a| *a == b"node")
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// A process's peak resident memory (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

/// A process's resident memory (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Every process, with its parent.
fn processes() -> Vec<(u32, u32)> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let ppid = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// Every process below `pid`, deepest first.
fn descendants(pid: u32) -> Vec<u32> {
    let all = processes();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(child, ppid) in &all {
            if ppid == parent && !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found.reverse();
    found
}

/// SIGKILLs a process this test started (directly or through sshd).
pub fn kill9(pid: u32) {
    signal(pid, libc::SIGKILL);
}

/// Sends `sig` to a process this test started (directly or through sshd): SIGSTOP freezes an
/// agent with its pipes open, as a hung node would be.
#[allow(unsafe_code)]
pub fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether process `pid` has `path` open (how a test finds the agent serving a read).
pub fn has_open(pid: u32, path: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
}

/// The SSH banner of the server at `addr`, if one answers within a second.
fn banner(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.starts_with("SSH-").then_some(text)
}

fn keygen(path: &Path) -> Result<()> {
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "chime-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (is openssh-client installed?)")?;
    if !output.status.success() {
        bail!("ssh-keygen failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn current_user() -> Result<String> {
    let output = Command::new("id").arg("-un").output().context("running id -un")?;
    let user = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || user.is_empty() {
        bail!("id -un failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(user)
}

fn password_locked(user: &str) -> bool {
    let Ok(shadow) = fs::read_to_string("/etc/shadow") else { return false };
    shadow.lines().filter_map(|line| line.split_once(':')).any(|(name, rest)| name == user && rest.starts_with('!'))
}

#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
