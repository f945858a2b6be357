//! Starts a real `chimed` for a test: free loopback ports, a temporary data dir, a log file, and
//! helpers to get connected clients and a pre-configured `chime` CLI command.
//!
//! The daemon is the binary built by `cargo build --workspace`; tests never build it themselves.
//! Readiness is a TCP connect plus a full protocol handshake on the plaintext port, bounded in
//! time. When a test panics, `Drop` prints the daemon's log so the failure can be read in context.

use chime_client::blocking::{Client, ConnectOptions};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The password every test user gets.
pub const PASSWORD: &str = "correct horse battery";

/// How long a daemon may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `stop()` waits for a clean exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which store a daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded SQLite store in the data dir.
    Sqlite,
    /// PostgreSQL (a throwaway database on the shared test server).
    Postgres,
}

impl Backend {
    /// Both stores, for tests that run every scenario on each.
    pub const ALL: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

    /// A short lower-case name, for database and user names.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// The `--database` for a fresh store: `Some(None)` for SQLite (embedded in the data dir),
    /// `Some(Some(url))` for a new database on the shared PostgreSQL server, and `None` when
    /// PostgreSQL tests are skipped (`CHIME_SKIP_PG=1`).
    pub fn fresh_database(self, test: &str) -> Option<Option<String>> {
        match self {
            Backend::Sqlite => Some(None),
            Backend::Postgres => crate::postgres::shared().map(|pg| Some(pg.create_database(test))),
        }
    }
}

/// How to start a daemon.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Database URL; `None` runs the embedded SQLite store in the data dir.
    pub database: Option<String>,
    /// Extra `chimed` flags (`--heartbeat-secs 1`, ...).
    pub extra_args: Vec<String>,
    /// Run on this data dir (to restart on an earlier run's data); `None`: a fresh temp dir.
    pub data_dir: Option<PathBuf>,
    /// Extra environment variables of the daemon's process (test hooks such as
    /// `CHIMED_TEST_CRASH`), set per daemon rather than in the test process, whose other
    /// tests start daemons of their own in parallel.
    pub env: Vec<(String, String)>,
}

impl DaemonOptions {
    /// Options with these extra flags added.
    pub fn with_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Options with this environment variable set in the daemon's process.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A user registered on a test daemon, with its logged-in client.
pub struct TestUser {
    /// The connected, logged-in client.
    pub client: Client,
    /// The unique user name.
    pub name: String,
    /// The user's id.
    pub user_id: u64,
    /// The session token from registration (resumable from other connections).
    pub token: String,
}

/// A running `chimed` owned by a test. Dropping it kills the process and removes the temp dir.
pub struct Daemon {
    /// The process, while running.
    child: Option<Child>,
    /// The flags it was started with, to restart identically.
    opts: DaemonOptions,
    /// The data dir in use.
    data_dir: PathBuf,
    /// Owns the data dir when the harness created it.
    _temp: Option<tempfile::TempDir>,
    /// Plaintext listener (`--plaintext-listen`).
    plaintext: SocketAddr,
    /// TLS listener (`--listen`).
    tls: SocketAddr,
    /// Where the daemon's stderr goes.
    log_path: PathBuf,
}

/// Numbers user names so every name is unique within a test process.
static NEXT_USER: AtomicU64 = AtomicU64::new(1);

/// The workspace's target dir (honours `CARGO_TARGET_DIR`).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"),
    }
}

/// Path to a workspace binary in `target/debug`, or a panic saying how to build it.
pub fn binary(name: &str) -> PathBuf {
    // Benchmarks point this at a release build.
    let dir = std::env::var_os("CHIME_BIN_DIR").map_or_else(|| target_dir().join("debug"), PathBuf::from);
    let path = dir.join(name);
    assert!(path.is_file(), "{} not found: run `cargo build --workspace` before the integration tests", path.display());
    path
}

/// A loopback address with a port nobody was listening on a moment ago.
fn free_addr() -> SocketAddr {
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => panic!("cannot bind a loopback port: {e}"),
    };
    match listener.local_addr() {
        Ok(a) => a,
        Err(e) => panic!("bound socket has no address: {e}"),
    }
}

impl Daemon {
    /// Starts a daemon and waits until it completes a handshake. Panics (with the log) on failure.
    pub fn start(opts: DaemonOptions) -> Daemon {
        let (data_dir, temp) = match &opts.data_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let temp = match tempfile::Builder::new().prefix("chimed-test-").tempdir() {
                    Ok(t) => t,
                    Err(e) => panic!("cannot create a temp dir: {e}"),
                };
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        // Private, as chimed makes the data dirs it creates (it warns about shared ones); a dir
        // the test passes in is left as the test made it.
        if !data_dir.exists() {
            let mut builder = fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            if let Err(e) = builder.create(&data_dir) {
                panic!("cannot create {}: {e}", data_dir.display());
            }
        }
        #[cfg(unix)]
        if temp.is_some() {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700));
        }
        let log_path = data_dir.join("chimed-test.log");
        // Ports are picked then released, so another process may grab one in between: retry on
        // fresh ports a few times before calling it a failure.
        let mut last_failure = String::new();
        for _ in 0..3 {
            let mut daemon = Daemon {
                child: None,
                opts: opts.clone(),
                data_dir: data_dir.clone(),
                _temp: None,
                plaintext: free_addr(),
                tls: free_addr(),
                log_path: log_path.clone(),
            };
            match daemon.spawn_and_wait() {
                Ok(()) => {
                    daemon._temp = temp;
                    return daemon;
                }
                Err(why) => {
                    last_failure = why;
                    daemon.kill_quietly();
                }
            }
        }
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        panic!("chimed did not start: {last_failure}\n--- chimed log ---\n{log}");
    }

    /// Starts a daemon on a fresh store of `backend` with extra flags; `None` when that backend's
    /// tests are skipped.
    pub fn start_backend(backend: Backend, test: &str, extra_args: &[&str]) -> Option<Daemon> {
        let database = backend.fresh_database(test)?;
        Some(Daemon::start(DaemonOptions {
            database,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            data_dir: None,
            env: Vec::new(),
        }))
    }

    /// Spawns the process and waits until a handshake succeeds, the process dies, or time is up.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("cannot open {}: {e}", self.log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| format!("cannot clone log handle: {e}"))?;
        let mut cmd = Command::new(binary("chimed"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.tls.to_string())
            .arg("--plaintext-listen")
            .arg(self.plaintext.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(db) = &self.opts.database {
            cmd.arg("--database").arg(db);
        }
        cmd.args(&self.opts.extra_args)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", std::env::var("CHIMED_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = cmd.spawn().map_err(|e| format!("cannot spawn chimed: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("chimed exited during start-up with {status}"));
                }
            }
            if TcpStream::connect_timeout(&self.plaintext, Duration::from_millis(200)).is_ok() {
                let mut opts = ConnectOptions::new(self.plaintext.to_string(), false);
                opts.timeout = Duration::from_secs(2);
                if Client::connect(&opts).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no handshake on {} within {READY_TIMEOUT:?}", self.plaintext));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The plaintext listener's address.
    pub fn plaintext_addr(&self) -> SocketAddr {
        self.plaintext
    }

    /// The TLS listener's address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The daemon's database, for writing test data straight into it.
    pub fn database(&self) -> crate::seed::Database {
        match &self.opts.database {
            Some(url) => crate::seed::Database::Postgres(url.clone()),
            None => crate::seed::Database::Sqlite(self.data_dir.join("chime.db")),
        }
    }

    /// The daemon's resident memory (VmRSS), in KiB; 0 once it is gone.
    pub fn rss_kib(&self) -> u64 {
        let Some(pid) = self.pid() else { return 0 };
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILLs the daemon and reaps it: nothing gets a chance to flush.
    pub fn kill9(&mut self) {
        self.note("test: kill -9");
        self.kill_quietly();
    }

    fn kill_quietly(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Drops an environment variable given with [`DaemonOptions::with_env`], for the next
    /// [`Daemon::restart`] (a crash hook that fired once, say).
    pub fn remove_env(&mut self, key: &str) {
        self.opts.env.retain(|(k, _)| k != key);
    }

    /// Starts the daemon again on the same data dir, ports and database (after `kill9`/`stop`).
    pub fn restart(&mut self) {
        self.kill_quietly();
        self.note("test: restart");
        if let Err(why) = self.spawn_and_wait() {
            self.kill_quietly();
            panic!("chimed did not restart: {why}\n--- chimed log ---\n{}", self.log());
        }
    }

    /// SIGTERMs the daemon and asserts it exits 0 within 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            panic!("stop(): chimed is not running");
        };
        send_sigterm(child.id());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    assert!(status.success(), "chimed exited with {status} after SIGTERM\n{}", self.log());
                    return;
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("chimed did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}", self.log());
                }
            }
        }
    }

    /// Connect options for the plaintext listener.
    pub fn connect_options(&self) -> ConnectOptions {
        let mut opts = ConnectOptions::new(self.plaintext.to_string(), false);
        opts.client_name = "chime-tests".into();
        opts.timeout = Duration::from_secs(10);
        opts
    }

    /// A connected (not logged-in) plaintext client.
    pub fn client(&self) -> Client {
        match Client::connect(&self.connect_options()) {
            Ok(c) => c,
            Err(e) => panic!("cannot connect to chimed at {}: {e:?}", self.plaintext),
        }
    }

    /// A freshly registered, logged-in user whose name starts with `name`.
    pub fn register(&self, name: &str) -> TestUser {
        let unique = format!("{name}{}", NEXT_USER.fetch_add(1, Ordering::Relaxed));
        let mut client = self.client();
        // Registrations are rate-limited per address like logins; a test that sets up many users
        // on an idle machine can outrun the burst, so it waits as the server says, a bounded
        // number of times.
        let mut tries = 0;
        let authed = loop {
            match client.register(&unique, PASSWORD, "chime-tests") {
                Ok(a) => break a,
                Err(chime_client::ClientError::Server(e))
                    if e.code == chime_protocol::ErrorCode::RATE_LIMITED && tries < 50 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(e) => panic!("register {unique}: {e:?}"),
            }
        };
        let Some(token) = authed.token else {
            panic!("register {unique}: AUTHED carries no token");
        };
        TestUser { client, name: unique, user_id: authed.user_id.get(), token }
    }

    /// A registered, logged-in client with a unique name starting with `name`.
    pub fn user(&self, name: &str) -> Client {
        self.register(name).client
    }

    /// A plaintext client logged in with an existing session token.
    pub fn resume(&self, token: &str) -> Client {
        let mut client = self.client();
        if let Err(e) = client.resume(token, "chime-tests") {
            panic!("resume: {e:?}");
        }
        client
    }

    /// The `chime` CLI talking plaintext to this daemon, with `--home`, `--json` and the password.
    pub fn cli(&self, home: &Path) -> Command {
        let mut cmd = self.chime(self.plaintext, home);
        cmd.arg("--plaintext");
        cmd
    }

    /// The `chime` CLI talking TLS to this daemon (trust on first use), with `--home` and `--json`.
    pub fn cli_tls(&self, home: &Path) -> Command {
        self.chime(self.tls, home)
    }

    fn chime(&self, server: SocketAddr, home: &Path) -> Command {
        let mut cmd = Command::new(binary("chime"));
        cmd.arg("--server")
            .arg(server.to_string())
            .arg("--home")
            .arg(home)
            .arg("--json")
            .env("CHIME_PASSWORD", PASSWORD)
            .env_remove("CHIME_SERVER")
            .env_remove("CHIME_HOME")
            .stdin(Stdio::null());
        cmd
    }

    /// Appends a marker line to the log, so restarts and kills are visible in it.
    fn note(&self, line: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(f, "==== {line} ====");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_quietly();
        if std::thread::panicking() {
            eprintln!("--- chimed log ({}) ---\n{}--- end of chimed log ---", self.log_path.display(), self.log());
            // Keep the data dir for a post-mortem only when asked to.
            if std::env::var_os("CHIME_TEST_KEEP").is_some() {
                if let Some(temp) = self._temp.take() {
                    eprintln!("keeping {}", temp.keep().display());
                }
            }
        }
    }
}

/// Sends SIGTERM to a process we spawned.
#[allow(unsafe_code)]
fn send_sigterm(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        panic!("pid {pid} out of range");
    };
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child, not reaped yet.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM) failed: {}", std::io::Error::last_os_error());
}
