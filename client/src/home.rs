//! The client's home directory (`chime --home`, default `~/.config/chime`) and the two files in it.
//!
//! - `known_hosts`: one `HOST:PORT SHA256HEX` line per server whose TLS certificate fingerprint
//!   was pinned on first use, like SSH's file of the same name. Blank lines and `#` comments are
//!   allowed; any other malformed line is an error rather than skipped, because skipping it would
//!   silently re-pin whatever certificate the server presents next.
//! - `sessions.json`: per server address, the session token with its user. It holds secrets, so
//!   it is created with mode 0600 (the directory with 0700) and replaced atomically through a
//!   temporary file and a rename, so a crash never leaves half a file.
//!
//! Any Chime client may share the directory with `chime`: the formats are fixed. Nothing here
//! talks to a server; [`crate::blocking::Client::connect`] takes the pin as an option.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// File name of the pinned fingerprints.
pub const KNOWN_HOSTS: &str = "known_hosts";
/// File name of the stored sessions.
pub const SESSIONS: &str = "sessions.json";

/// Why the home directory could not be read or written. The `Display` of each variant says what
/// was attempted on which file; the cause is its `source()`.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// The directory could not be created.
    #[error("cannot create {}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be opened for writing.
    #[error("cannot open {}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A line of `known_hosts` is malformed.
    #[error("{} line {line}: expected `HOST:PORT SHA256HEX`", .path.display())]
    KnownHostsLine {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        #[source]
        source: KnownHostsLineError,
    },
    /// `sessions.json` is not what this module writes.
    #[error("{} is not valid", .path.display())]
    Sessions {
        /// The file.
        path: PathBuf,
        /// What JSON said.
        #[source]
        source: serde_json::Error,
    },
    /// The sessions could not be encoded (practically never).
    #[error("cannot encode sessions")]
    Encode(#[source] serde_json::Error),
    /// A server address that cannot be one field of `known_hosts`.
    #[error("server address `{0}` contains whitespace")]
    BadServer(String),
}

/// What is wrong with one `known_hosts` line.
#[derive(Debug, thiserror::Error)]
pub enum KnownHostsLineError {
    /// Not exactly two fields.
    #[error("wrong number of fields")]
    Fields,
    /// The second field is not a fingerprint.
    #[error("the fingerprint is not 64 hex digits")]
    Fingerprint(#[source] hex::FromHexError),
}

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

    /// The default directory, `$HOME/.config/chime`; `None` when `HOME` is unset or empty.
    pub fn default_dir() -> Option<PathBuf> {
        match std::env::var_os("HOME") {
            Some(home) if !home.is_empty() => Some(Path::new(&home).join(".config/chime")),
            _ => None,
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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
    fn ensure_dir(&self) -> Result<(), HomeError> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(&self.dir).map_err(|source| HomeError::CreateDir { path: self.dir.clone(), source })
    }

    /// The pinned fingerprint of `server`, if any.
    pub fn pinned(&self, server: &str) -> Result<Option<[u8; 32]>, HomeError> {
        let path = self.known_hosts_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HomeError::Read { path, source }),
        };
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (host, fingerprint) = parse_known_host(line).map_err(|source| HomeError::KnownHostsLine {
                path: path.clone(),
                line: index + 1,
                source,
            })?;
            if host == server {
                return Ok(Some(fingerprint));
            }
        }
        Ok(None)
    }

    /// Pins `fingerprint` for `server` by appending a line to `known_hosts`.
    pub fn pin(&self, server: &str, fingerprint: &[u8; 32]) -> Result<(), HomeError> {
        if server.contains(char::is_whitespace) {
            return Err(HomeError::BadServer(server.to_owned()));
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
        let mut file = match options.open(&path) {
            Ok(file) => file,
            Err(source) => return Err(HomeError::Open { path, source }),
        };
        writeln!(file, "{server} {}", hex::encode(fingerprint))
            .and_then(|()| file.sync_all())
            .map_err(|source| HomeError::Write { path, source })
    }

    /// Every stored session, keyed by server address.
    fn sessions(&self) -> Result<BTreeMap<String, Session>, HomeError> {
        let path = self.sessions_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => return Err(HomeError::Read { path, source }),
        };
        serde_json::from_str(&text).map_err(|source| HomeError::Sessions { path, source })
    }

    /// The session stored for `server`, if any.
    pub fn session(&self, server: &str) -> Result<Option<Session>, HomeError> {
        Ok(self.sessions()?.remove(server))
    }

    /// Stores `session` for `server`, replacing any earlier one.
    pub fn store_session(&self, server: &str, session: Session) -> Result<(), HomeError> {
        let mut all = self.sessions()?;
        all.insert(server.to_owned(), session);
        self.write_sessions(&all)
    }

    /// Forgets the session for `server`; returns it if there was one.
    pub fn remove_session(&self, server: &str) -> Result<Option<Session>, HomeError> {
        let mut all = self.sessions()?;
        let removed = all.remove(server);
        if removed.is_some() {
            self.write_sessions(&all)?;
        }
        Ok(removed)
    }

    /// Replaces `sessions.json` atomically: write a 0600 temporary file in the same directory,
    /// flush it to disk, then rename it over the old file.
    fn write_sessions(&self, all: &BTreeMap<String, Session>) -> Result<(), HomeError> {
        self.ensure_dir()?;
        let path = self.sessions_path();
        let tmp = self.dir.join(format!(".{SESSIONS}.{}.tmp", std::process::id()));
        let mut json = serde_json::to_vec_pretty(all).map_err(HomeError::Encode)?;
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
        if let Err(source) = written {
            // Best effort: a leftover temporary file is harmless but untidy.
            let _ = fs::remove_file(&tmp);
            return Err(HomeError::Write { path, source });
        }
        Ok(())
    }
}

/// Parses one non-comment `known_hosts` line.
fn parse_known_host(line: &str) -> Result<(&str, [u8; 32]), KnownHostsLineError> {
    let mut fields = line.split_whitespace();
    let (Some(host), Some(hex_fp), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(KnownHostsLineError::Fields);
    };
    let mut fingerprint = [0u8; 32];
    hex::decode_to_slice(hex_fp, &mut fingerprint).map_err(KnownHostsLineError::Fingerprint)?;
    Ok((host, fingerprint))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error with its causes, as `chime` prints it (`anyhow`'s `{:#}`).
    fn chain(err: &HomeError) -> String {
        let mut text = err.to_string();
        let mut cause = std::error::Error::source(err);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        text
    }

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
        assert!(matches!(home.pin("a b:1", &a), Err(HomeError::BadServer(_))));
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
        let text = chain(&err);
        assert!(
            text.contains("line 2: expected `HOST:PORT SHA256HEX`: the fingerprint is not 64 hex digits"),
            "{text}"
        );

        fs::write(home.known_hosts_path(), "h:1\n").expect("write");
        let text = chain(&home.pinned("h:1").expect_err("one field"));
        assert!(text.ends_with("line 1: expected `HOST:PORT SHA256HEX`: wrong number of fields"), "{text}");
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
        let names: Vec<_> = fs::read_dir(home.dir()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn the_sessions_file_format_is_fixed() {
        let (_dir, home) = temp_home();
        home.store_session("a:1", session("alice")).expect("store");
        let text = fs::read_to_string(home.sessions_path()).expect("file");
        assert_eq!(
            text,
            "{\n  \"a:1\": {\n    \"token\": \"token-alice\",\n    \"user\": \"alice\",\n    \"user_id\": 7\n  }\n}\n"
        );
    }

    #[cfg(unix)]
    #[test]
    fn secrets_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, home) = temp_home();
        home.store_session("a:1", session("alice")).expect("store");
        home.pin("a:1", &[0; 32]).expect("pin");
        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(home.dir()), 0o700);
        assert_eq!(mode(&home.sessions_path()), 0o600);
        assert_eq!(mode(&home.known_hosts_path()), 0o600);
    }

    #[test]
    fn a_corrupt_sessions_file_is_an_error_naming_it() {
        let (_dir, home) = temp_home();
        home.ensure_dir().expect("dir");
        fs::write(home.sessions_path(), "{not json").expect("write");
        let err = home.session("a:1").expect_err("corrupt");
        assert!(chain(&err).contains(SESSIONS), "{err:?}");
    }
}
