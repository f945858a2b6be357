//! Connecting to the server: TLS with trust-on-first-use pinning, resuming the stored session,
//! and turning client errors into the one-line reasons `chime` prints.
//!
//! Every command opens its own connection through [`Ctx`]. A TLS connection to a server with no
//! pinned fingerprint accepts the certificate, pins its SHA-256 fingerprint in `known_hosts` and
//! says so on stderr; later connections hand the pin to the client, which refuses a different
//! certificate before any password or token is sent.

use crate::output::Output;
use anyhow::anyhow;
use chime_client::blocking::{Client, ClientError, ConnectOptions};
use chime_client::fingerprint_hex;
use chime_client::home::{Home, HomeError, Session};
use chime_protocol::ErrorCode;
use std::io;
use std::path::{Path, PathBuf};

/// The client's version, sent in `HELLO` and the user agent.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The user agent stored with sessions: `chime/VERSION (OS)`.
pub fn user_agent() -> String {
    format!("chime/{VERSION} ({})", std::env::consts::OS)
}

/// A failed call: either what the client reported, which may be worth retrying, or a local
/// problem (files, a refused pin, no session) that a retry cannot fix.
#[derive(Debug)]
pub enum CallError {
    /// From the connection or the server.
    Client(ClientError),
    /// Anything else, already worded for the user.
    Local(anyhow::Error),
}

impl CallError {
    /// Whether reconnecting and trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CallError::Client(e) => e.is_retryable(),
            CallError::Local(_) => false,
        }
    }
}

impl From<ClientError> for CallError {
    fn from(e: ClientError) -> Self {
        CallError::Client(e)
    }
}

impl From<io::Error> for CallError {
    fn from(e: io::Error) -> Self {
        CallError::Local(e.into())
    }
}

impl From<HomeError> for CallError {
    fn from(e: HomeError) -> Self {
        CallError::Local(e.into())
    }
}

impl From<anyhow::Error> for CallError {
    fn from(e: anyhow::Error) -> Self {
        CallError::Local(e)
    }
}

/// The home from `--home`/`CHIME_HOME`, or else `$HOME/.config/chime`.
pub fn home_from_flag(flag: Option<PathBuf>) -> anyhow::Result<Home> {
    match flag.or_else(Home::default_dir) {
        Some(dir) => Ok(Home::new(dir)),
        None => Err(anyhow!("no home directory: HOME is not set (pass --home DIR or set CHIME_HOME)")),
    }
}

/// What every command needs: the server, the home directory and stdout.
pub struct Ctx {
    /// `HOST:PORT` of the server.
    pub server: String,
    /// Whether to use TLS (not `--plaintext`).
    pub tls: bool,
    /// The home directory.
    pub home: Home,
    /// Whether `--password-stdin` was given.
    pub password_stdin: bool,
    /// Where records go.
    pub out: Output<io::Stdout>,
}

impl Ctx {
    /// Opens a connection and completes the handshake, pinning the server's fingerprint on the
    /// first TLS connection.
    pub fn connect(&self) -> Result<Client, CallError> {
        let pinned = if self.tls { self.home.pinned(&self.server)? } else { None };
        let mut opts = ConnectOptions::new(self.server.clone(), self.tls);
        opts.pinned_fingerprint = pinned;
        opts.client_name = "chime".into();
        opts.client_version = VERSION.into();
        let client = match Client::connect(&opts) {
            Ok(client) => client,
            Err(ClientError::FingerprintMismatch { expected, got }) => {
                return Err(CallError::Local(mismatch_error(
                    &self.server,
                    &expected,
                    &got,
                    &self.home.known_hosts_path(),
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if self.tls && pinned.is_none() {
            let Some(fingerprint) = client.server_fingerprint() else {
                return Err(CallError::Local(anyhow!(
                    "the TLS connection to {} reported no certificate fingerprint to pin",
                    self.server
                )));
            };
            self.home.pin(&self.server, &fingerprint)?;
            eprintln!("chime: pinned server {} fingerprint SHA256:{}", self.server, fingerprint_hex(&fingerprint));
        }
        Ok(client)
    }

    /// The stored session for this server, or the "not logged in" error.
    pub fn session(&self) -> Result<Session, CallError> {
        match self.home.session(&self.server)? {
            Some(session) => Ok(session),
            None => Err(CallError::Local(anyhow!("not logged in to {} (run `chime login USER`)", self.server))),
        }
    }

    /// Connects and logs in with the stored session token.
    pub fn connect_authed(&self) -> Result<(Client, Session), CallError> {
        let session = self.session()?;
        let mut client = self.connect()?;
        match client.resume(&session.token, &user_agent()) {
            Ok(_) => Ok((client, session)),
            Err(ClientError::Server(body)) if body.code == ErrorCode::AUTH_FAILED => Err(CallError::Local(anyhow!(
                "the stored session of {} on {} was refused: {body}; run `chime login {}`",
                session.user,
                self.server,
                session.user
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Turns a failed call into the error `main` prints.
    pub fn explain(&self, err: CallError) -> anyhow::Error {
        match err {
            CallError::Local(e) => e,
            CallError::Client(e) => anyhow!(describe(&e, &self.server)),
        }
    }
}

/// The refusal of a certificate that does not match the pin, naming both fingerprints and the
/// file to edit if the change was intended.
fn mismatch_error(server: &str, expected: &str, got: &str, file: &Path) -> anyhow::Error {
    let bare = |s: &str| s.strip_prefix("SHA256:").unwrap_or(s).to_owned();
    anyhow!(
        "server {server} presented certificate fingerprint SHA256:{} but SHA256:{} is pinned \
         in {}; refusing to connect (if the server's certificate was changed on purpose, delete \
         its line from that file)",
        bare(got),
        bare(expected),
        file.display()
    )
}

/// One line saying what went wrong with a call to `server`.
pub fn describe(err: &ClientError, server: &str) -> String {
    match err {
        // The server's message names the object, the code says which rule: "not a member of
        // room 3 (NOT_MEMBER)".
        ClientError::Server(body) => body.to_string(),
        ClientError::Io(e) => format!("connection to {server} failed: {e}"),
        ClientError::Tls(e) => format!("TLS with {server} failed: {e} (for a plaintext listener pass --plaintext)"),
        ClientError::FingerprintMismatch { expected, got } => {
            format!("server {server} presented certificate fingerprint {got}, expected {expected}")
        }
        ClientError::Closed(Some(goodbye)) => {
            format!("{server} closed the connection: {} ({})", goodbye.message, goodbye.code)
        }
        ClientError::Closed(None) => format!("{server} closed the connection"),
        ClientError::Timeout => format!("{server} did not answer in time"),
        ClientError::Decode(e) => format!("bad frame from {server}: {e}"),
        ClientError::Encode(e) => format!("request not sent: {e}"),
        ClientError::Protocol(e) => format!("protocol error from {server}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chime_protocol::ErrorBody;

    #[test]
    fn server_errors_read_as_message_and_code() {
        let err = ClientError::Server(ErrorBody::new(ErrorCode::NOT_MEMBER, "not a member of room 3"));
        assert_eq!(describe(&err, "h:1"), "not a member of room 3 (NOT_MEMBER)");
    }

    #[test]
    fn a_mismatch_names_both_fingerprints_and_the_file() {
        let text = format!("{}", mismatch_error("h:1", "aa", "SHA256:bb", Path::new("/home/x/known_hosts")));
        assert!(text.contains("SHA256:bb but SHA256:aa is pinned"), "{text}");
        assert!(text.contains("/home/x/known_hosts"), "{text}");
    }

    #[test]
    fn user_agent_names_the_program_and_os() {
        let ua = user_agent();
        assert!(ua.starts_with(&format!("chime/{VERSION} (")), "{ua}");
    }
}
