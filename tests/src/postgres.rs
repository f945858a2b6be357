//! A real, throwaway PostgreSQL server for tests.
//!
//! [`PgServer::start`] runs `initdb` into a temporary directory and starts the server with
//! `pg_ctl` on a free loopback port; dropping it stops the server (`-m immediate`) and removes the
//! directory. Tests normally share one server per test binary through [`shared`], each taking a
//! fresh database with [`PgServer::create_database`]; that server is stopped by an exit hook when
//! the test binary ends, because statics are never dropped. [`PgServer::psql`] runs SQL on one of
//! its databases from outside the code under test.
//!
//! PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user
//! (created if missing) through `runuser`.
//!
//! Missing PostgreSQL binaries fail the tests that need them, with a message saying what to
//! install; set `CHIME_SKIP_PG=1` to skip those tests instead.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// Environment variable that, set to `1`, skips PostgreSQL tests instead of failing them when no
/// server can be started.
pub const SKIP_ENV: &str = "CHIME_SKIP_PG";

/// How long `pg_ctl` may take to start or stop the server, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// A running throwaway PostgreSQL server.
pub struct PgServer {
    /// Directory holding `initdb`, `pg_ctl` and `createdb`.
    bin: PathBuf,
    /// Temporary root: `data/` (the cluster), `sock/` (its Unix socket), `server.log`.
    root: PathBuf,
    /// The loopback TCP port it listens on.
    port: u16,
    /// The account the server runs as when we are root (PostgreSQL refuses root).
    run_as: Option<String>,
    /// Set once stopped, so `stop` runs once whether from `Drop` or the exit hook.
    stopped: AtomicBool,
}

/// Whether PostgreSQL's server binaries (`initdb`, `pg_ctl`) can be found.
pub fn available() -> bool {
    find_bin_dir().is_some()
}

/// Whether `CHIME_SKIP_PG=1` asks to skip PostgreSQL tests.
pub fn skip_requested() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|v| v == "1")
}

static SHARED: OnceLock<std::result::Result<PgServer, String>> = OnceLock::new();

/// The server shared by every test of this test binary, started on first use and stopped when
/// the process exits. `None` only when `CHIME_SKIP_PG=1`; panics with the reason when no server
/// can be started otherwise, so a machine without PostgreSQL fails loudly rather than passing
/// without testing anything.
pub fn shared() -> Option<&'static PgServer> {
    if skip_requested() {
        eprintln!("{SKIP_ENV}=1: skipping a PostgreSQL test");
        return None;
    }
    let server = SHARED.get_or_init(|| {
        let server = PgServer::start().map_err(|e| format!("{e:#}"))?;
        exit_hook::register(stop_shared);
        Ok(server)
    });
    match server {
        Ok(server) => Some(server),
        Err(reason) => panic!(
            "cannot start a throwaway PostgreSQL server: {reason}\n\
             Install the PostgreSQL server binaries (e.g. `apt-get install postgresql`), or set \
             {SKIP_ENV}=1 to skip PostgreSQL tests."
        ),
    }
}

/// Stops the shared server; run by the exit hook.
fn stop_shared() {
    if let Some(Ok(server)) = SHARED.get() {
        server.stop();
    }
}

impl PgServer {
    /// Initializes a cluster in a new temporary directory and starts a server on a free
    /// loopback port.
    pub fn start() -> Result<PgServer> {
        let bin = find_bin_dir().context(
            "PostgreSQL server binaries (initdb, pg_ctl) are neither on PATH nor in /usr/lib/postgresql/*/bin",
        )?;
        let run_as = if is_root() { Some(ensure_postgres_user()?) } else { None };
        let root =
            tempfile::Builder::new().prefix("chime-pg-").tempdir().context("creating a temporary directory")?.keep();
        let mut server = PgServer { bin, root, port: 0, run_as, stopped: AtomicBool::new(false) };
        // From here on, dropping `server` removes the directory whatever fails.
        std::fs::create_dir(server.root.join("sock")).context("creating the socket directory")?;
        if let Some(user) = &server.run_as {
            chown_to(&server.root, user)?;
            chown_to(&server.root.join("sock"), user)?;
        }
        let data = server.root.join("data");
        server
            .run_pg(
                "initdb",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "--auth=trust".as_ref(),
                    "-E".as_ref(),
                    "UTF8".as_ref(),
                    "--locale=C".as_ref(),
                    // Only the initial files; the server itself runs with fsync on.
                    "--no-sync".as_ref(),
                ],
            )
            .context("initdb")?;
        // A port picked this way can be taken by someone else before the server binds it:
        // try a few.
        let mut last_error = None;
        for _ in 0..5 {
            server.port = free_port()?;
            match server.pg_ctl_start(&data) {
                Ok(()) => {
                    server.run_createdb("chime").context("creating the default database")?;
                    return Ok(server);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .with_context(|| format!("starting PostgreSQL (log: {})", server.root.join("server.log").display()))
    }

    /// The cluster's data directory (every file PostgreSQL keeps: heap, indexes, TOAST, pg_wal).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The URL of the default database, `postgres://postgres@127.0.0.1:PORT/chime`.
    pub fn url(&self) -> String {
        self.url_of("chime")
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a fresh, empty database and returns its URL. The name gets a process-unique
    /// suffix, so tests may reuse names; characters other than `[a-z0-9_]` become `_`.
    pub fn create_database(&self, name: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let clean: String = name
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        let db = format!("{clean}_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        if let Err(e) = self.run_createdb(&db) {
            panic!("cannot create database {db}: {e:#}");
        }
        self.url_of(&db)
    }

    /// Runs SQL with `psql` on the database at `url` (one of this server's) and returns what it
    /// printed: unaligned, without headers, one line per row. Tests use it to act on the server
    /// from outside the code under test (terminating its connections, say).
    pub fn psql(&self, url: &str, sql: &str) -> Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        let output = check("psql", output)?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Stops the server and removes its directory. Later calls do nothing.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let data = self.root.join("data");
        if data.join("postmaster.pid").exists() {
            let args = [
                "stop".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                PG_CTL_TIMEOUT_SECS.as_ref(),
            ];
            if let Err(e) = self.run_pg("pg_ctl", &args) {
                eprintln!("stopping the throwaway PostgreSQL at {}: {e:#}", data.display());
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            eprintln!("removing {}: {e}", self.root.display());
        }
    }

    /// Restarts the server the way an unattended update does (`pg_ctl restart -m fast`: every
    /// connection is terminated, the server comes back on the same port), waiting until it accepts
    /// connections again.
    pub fn restart_fast(&self) -> Result<()> {
        let data = self.root.join("data");
        let log = self.root.join("server.log");
        let args = [
            "restart".as_ref(),
            "-D".as_ref(),
            data.as_os_str(),
            "-l".as_ref(),
            log.as_os_str(),
            "-m".as_ref(),
            "fast".as_ref(),
            "-w".as_ref(),
            "-t".as_ref(),
            PG_CTL_TIMEOUT_SECS.as_ref(),
        ];
        self.run_pg("pg_ctl", &args).map(drop)
    }

    /// Stops the server (`pg_ctl stop -m fast`) but keeps its data, for [`PgServer::start_again`].
    pub fn stop_fast(&self) -> Result<()> {
        let data = self.root.join("data");
        let args = ["stop".as_ref(), "-D".as_ref(), data.as_os_str(), "-m".as_ref(), "fast".as_ref(), "-w".as_ref()];
        self.run_pg("pg_ctl", &args).map(drop)
    }

    /// Starts a server stopped with [`PgServer::stop_fast`] again, on the same port.
    pub fn start_again(&self) -> Result<()> {
        self.pg_ctl_start(&self.root.join("data"))
    }

    fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn pg_ctl_start(&self, data: &Path) -> Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200",
            self.port,
            self.root.join("sock").display()
        );
        let log = self.root.join("server.log");
        self.run_pg(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                PG_CTL_TIMEOUT_SECS.as_ref(),
            ],
        )
        .map(drop)
    }

    fn run_createdb(&self, db: &str) -> Result<()> {
        let port = self.port.to_string();
        let args = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres", db];
        let output = Command::new(self.bin.join("createdb"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running createdb")?;
        check("createdb", output).map(drop)
    }

    /// Runs one of the server binaries, as the `postgres` user when we are root.
    fn run_pg(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<Output> {
        let program = self.bin.join(tool);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        // The server user may not be allowed into the caller's working directory.
        let output = command
            .args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        check(tool, output)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fails with the tool's stderr when it exited unsuccessfully.
fn check(tool: &str, output: Output) -> Result<Output> {
    if output.status.success() {
        return Ok(output);
    }
    bail!(
        "{tool} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout).trim()
    )
}

/// The directory holding `initdb`, `pg_ctl` and `createdb`: from PATH, else the newest
/// `/usr/lib/postgresql/VERSION/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| ["initdb", "pg_ctl", "createdb"].iter().all(|tool| dir.join(tool).is_file());
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            // PATH often holds symlinks to a few of the tools only (/usr/local/bin/initdb ->
            // /usr/lib/postgresql/15/bin/initdb): prefer the directory they point into.
            let real = std::fs::canonicalize(dir.join("initdb")).ok().and_then(|p| p.parent().map(Path::to_path_buf));
            if let Some(real) = real.filter(|real| has_tools(real)) {
                return Some(real);
            }
            if has_tools(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.split('.').map(|part| part.parse().ok()).collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes sure the `postgres` system user exists and returns its name.
fn ensure_postgres_user() -> Result<String> {
    const USER: &str = "postgres";
    let exists = Command::new("id").args(["-u", USER]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !exists.is_ok_and(|s| s.success()) {
        let output =
            Command::new("useradd").args(["--system", "--no-create-home", USER]).output().context("running useradd")?;
        check("useradd", output)?;
    }
    Ok(USER.into())
}

/// Gives `path` to `user` (and the user's primary group).
fn chown_to(path: &Path, user: &str) -> Result<()> {
    let id = |flag: &str| -> Result<u32> {
        let output = check("id", Command::new("id").args([flag, user]).output().context("running id")?)?;
        String::from_utf8_lossy(&output.stdout).trim().parse().context("parsing id's output")
    };
    std::os::unix::fs::chown(path, Some(id("-u")?), Some(id("-g")?))
        .with_context(|| format!("chown {}", path.display()))
}

/// Runs a function when the process exits normally (including after the test harness reports
/// failures), which is how the shared server, a static that is never dropped, gets stopped.
mod exit_hook {
    use std::sync::Mutex;

    static HOOKS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

    pub(super) fn register(hook: fn()) {
        let mut hooks = HOOKS.lock().unwrap_or_else(|p| p.into_inner());
        if hooks.is_empty() {
            install();
        }
        hooks.push(hook);
    }

    extern "C" fn run_hooks() {
        // A panic must not unwind into libc.
        let _ = std::panic::catch_unwind(|| {
            let hooks = std::mem::take(&mut *HOOKS.lock().unwrap_or_else(|p| p.into_inner()));
            for hook in hooks {
                hook();
            }
        });
    }

    #[allow(unsafe_code)]
    fn install() {
        // SAFETY: `run_hooks` is a plain `extern "C" fn()` that never unwinds, as atexit requires.
        let rc = unsafe { libc::atexit(run_hooks) };
        if rc != 0 {
            eprintln!("atexit failed: the throwaway PostgreSQL may outlive this process");
        }
    }
}
