//! The client's home directory (`--home`, default `~/.config/chime`) and the two files in it.
//!
//! - `known_hosts`: one `HOST:PORT SHA256HEX` line per server whose TLS certificate fingerprint
//!   was pinned on first use, like SSH's file of the same name. Blank lines and `#` comments are
//!   allowed; any other malformed line is an error rather than skipped, because skipping it would
//!   silently re-pin whatever certificate the server presents next.
//! - `sessions.json`: per server address, the session token with its user. It holds secrets, so
//!   it is created with mode 0600 (the directory with 0700) and replaced atomically through a
//!   temporary file and a rename, so a crash never leaves half a file.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// File name of the pinned fingerprints.
pub const KNOWN_HOSTS: &str = "known_hosts";
/// File name of the stored sessions.
pub const SESSIONS: &str = "sessions.json";

/// A logged-in session as stored for one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The token `RESUME` takes.
    pub token: String,
    /// The user name.
    pub user: String,
    /// The user's id.
    pub user_id: u64,
}

/// The home directory. Nothing is created until something is written.
#[derive(Debug, Clone)]
pub struct Home {
    /// The directory.
    dir: PathBuf,
}

impl Home {
    /// A home at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Home { dir: dir.into() }
    }

    /// The home from `--home`/`CHIME_HOME`, or else `$HOME/.config/chime`.
    pub fn from_flag(flag: Option<PathBuf>) -> Result<Self> {
        if let Some(dir) = flag {
            return Ok(Home::new(dir));
        }
        match std::env::var_os("HOME") {
            Some(home) if !home.is_empty() => Ok(Home::new(Path::new(&home).join(".config/chime"))),
            _ => bail!("no home directory: HOME is not set (pass --home DIR or set CHIME_HOME)"),
        }
    }

    /// The path of `known_hosts`.
    pub fn known_hosts_path(&self) -> PathBuf {
        self.dir.join(KNOWN_HOSTS)
    }

    /// The path of `sessions.json`.
    pub fn sessions_path(&self) -> PathBuf {
        self.dir.join(SESSIONS)
    }

    /// Creates the directory (mode 0700 for any part created here) if it does not exist.
    fn ensure_dir(&self) -> Result<()> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))
    }

    /// The pinned fingerprint of `server`, if any.
    pub fn pinned(&self, server: &str) -> Result<Option<[u8; 32]>> {
        let path = self.known_hosts_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (host, fingerprint) = parse_known_host(line)
                .with_context(|| format!("{} line {}: expected `HOST:PORT SHA256HEX`", path.display(), index + 1))?;
            if host == server {
                return Ok(Some(fingerprint));
            }
        }
        Ok(None)
    }

    /// Pins `fingerprint` for `server` by appending a line to `known_hosts`.
    pub fn pin(&self, server: &str, fingerprint: &[u8; 32]) -> Result<()> {
        if server.contains(char::is_whitespace) {
            bail!("server address `{server}` contains whitespace");
        }
        self.ensure_dir()?;
        let path = self.known_hosts_path();
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(file, "{server} {}", hex::encode(fingerprint))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Every stored session, keyed by server address.
    fn sessions(&self) -> Result<BTreeMap<String, Session>> {
        let path = self.sessions_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    /// The session stored for `server`, if any.
    pub fn session(&self, server: &str) -> Result<Option<Session>> {
        Ok(self.sessions()?.remove(server))
    }

    /// Stores `session` for `server`, replacing any earlier one.
    pub fn store_session(&self, server: &str, session: Session) -> Result<()> {
        let mut all = self.sessions()?;
        all.insert(server.to_owned(), session);
        self.write_sessions(&all)
    }

    /// Forgets the session for `server`; returns it if there was one.
    pub fn remove_session(&self, server: &str) -> Result<Option<Session>> {
        let mut all = self.sessions()?;
        let removed = all.remove(server);
        if removed.is_some() {
            self.write_sessions(&all)?;
        }
        Ok(removed)
    }

    /// Replaces `sessions.json` atomically: write a 0600 temporary file in the same directory,
    /// flush it to disk, then rename it over the old file.
    fn write_sessions(&self, all: &BTreeMap<String, Session>) -> Result<()> {
        self.ensure_dir()?;
        let path = self.sessions_path();
        let tmp = self.dir.join(format!(".{SESSIONS}.{}.tmp", std::process::id()));
        let mut json = serde_json::to_vec_pretty(all).context("cannot encode sessions")?;
        json.push(b'\n');
        let written = (|| -> io::Result<()> {
            let mut options = OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            // Best effort: a leftover temporary file is harmless but untidy.
            let _ = fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        Ok(())
    }
}

/// Parses one non-comment `known_hosts` line.
fn parse_known_host(line: &str) -> Result<(&str, [u8; 32])> {
    let mut fields = line.split_whitespace();
    let (Some(host), Some(hex_fp), None) = (fields.next(), fields.next(), fields.next()) else {
        bail!("wrong number of fields");
    };
    let mut fingerprint = [0u8; 32];
    hex::decode_to_slice(hex_fp, &mut fingerprint).context("the fingerprint is not 64 hex digits")?;
    Ok((host, fingerprint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_home() -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().expect("temp dir");
        let home = Home::new(dir.path().join("nested/chime"));
        (dir, home)
    }

    fn session(user: &str) -> Session {
        Session { token: format!("token-{user}"), user: user.into(), user_id: 7 }
    }

    #[test]
    fn missing_files_mean_nothing_stored() {
        let (_dir, home) = temp_home();
        assert_eq!(home.pinned("127.0.0.1:7878").expect("read"), None);
        assert_eq!(home.session("127.0.0.1:7878").expect("read"), None);
        assert_eq!(home.remove_session("127.0.0.1:7878").expect("remove"), None);
    }

    #[test]
    fn pins_are_kept_per_server() {
        let (_dir, home) = temp_home();
        let a = [0xab; 32];
        let b = [0x01; 32];
        home.pin("127.0.0.1:7878", &a).expect("pin a");
        home.pin("example.org:7878", &b).expect("pin b");
        assert_eq!(home.pinned("127.0.0.1:7878").expect("read"), Some(a));
        assert_eq!(home.pinned("example.org:7878").expect("read"), Some(b));
        assert_eq!(home.pinned("127.0.0.1:7879").expect("read"), None);
        let text = fs::read_to_string(home.known_hosts_path()).expect("file");
        assert_eq!(text.lines().next(), Some(format!("127.0.0.1:7878 {}", "ab".repeat(32)).as_str()));
    }

    #[test]
    fn known_hosts_allows_comments_and_upper_case_but_not_garbage() {
        let (_dir, home) = temp_home();
        home.ensure_dir().expect("dir");
        let fp = "0A".repeat(32);
        fs::write(home.known_hosts_path(), format!("# pinned\n\nh:1 {fp}\n")).expect("write");
        assert_eq!(home.pinned("h:1").expect("read"), Some([0x0a; 32]));

        fs::write(home.known_hosts_path(), format!("h:1 {fp}\nh:2 nothex\n")).expect("write");
        let err = home.pinned("h:2").expect_err("garbage line");
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
    }

    #[test]
    fn sessions_round_trip_and_are_removed() {
        let (_dir, home) = temp_home();
        home.store_session("a:1", session("alice")).expect("store");
        home.store_session("b:2", session("bob")).expect("store");
        home.store_session("a:1", session("carol")).expect("replace");
        assert_eq!(home.session("a:1").expect("read"), Some(session("carol")));
        assert_eq!(home.remove_session("a:1").expect("remove"), Some(session("carol")));
        assert_eq!(home.session("a:1").expect("read"), None);
        assert_eq!(home.session("b:2").expect("read"), Some(session("bob")));
        // The temporary file of the atomic write is gone.
        let names: Vec<_> =
            fs::read_dir(home.dir.clone()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[cfg(unix)]
    #[test]
    fn secrets_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, home) = temp_home();
        home.store_session("a:1", session("alice")).expect("store");
        home.pin("a:1", &[0; 32]).expect("pin");
        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&home.dir), 0o700);
        assert_eq!(mode(&home.sessions_path()), 0o600);
        assert_eq!(mode(&home.known_hosts_path()), 0o600);
    }

    #[test]
    fn a_corrupt_sessions_file_is_an_error_naming_it() {
        let (_dir, home) = temp_home();
        home.ensure_dir().expect("dir");
        fs::write(home.sessions_path(), "{not json").expect("write");
        let err = home.session("a:1").expect_err("corrupt");
        assert!(format!("{err:#}").contains(SESSIONS), "{err:#}");
    }
}
