//! The daemon's TLS identity: the certificate the operator gave, or a self-signed one created in
//! the data dir on first start, and the rustls server configuration built from it.
//!
//! Clients pin the server by the SHA-256 of its leaf certificate (trust on first use, like SSH's
//! known_hosts), so the generated certificate must survive restarts: it is written once to
//! `DATA_DIR/tls/` and reused from then on. Regenerating it would make every client refuse the
//! server as an impostor.

use crate::config::{create_private_dir, Config};
use chime_protocol::fingerprint::cert_fingerprint;
pub use chime_protocol::fingerprint::fingerprint_hex;
use rustls::crypto::ring;
use rustls::server::NoServerSessionStorage;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The directory under the data dir that holds the generated certificate and key.
const TLS_DIR: &str = "tls";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// A ready server TLS configuration and the fingerprint clients will pin.
#[derive(Clone)]
pub struct TlsSetup {
    /// The rustls configuration every TLS connection is created from.
    pub config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate's DER encoding.
    pub fingerprint: [u8; 32],
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup").field("fingerprint", &fingerprint_hex(&self.fingerprint)).finish_non_exhaustive()
    }
}

/// Why the TLS identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file or directory could not be read, created or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A PEM file is malformed or holds nothing of the expected kind.
    #[error("{}: {what}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected in it.
        what: &'static str,
        /// The PEM parser's error.
        source: rustls_pki_types::pem::Error,
    },
    /// The generated certificate exists but its key does not (or the reverse was left behind).
    #[error("{cert} exists but {key} does not; restore the key or remove the certificate to create a new one (clients that pinned the old one will refuse the new one)", cert = cert.display(), key = key.display())]
    MissingKey {
        /// The certificate found.
        cert: PathBuf,
        /// The key that should be next to it.
        key: PathBuf,
    },
    /// Generating the self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key (for example a key that does not match).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The private key file can be read or written by users other than its owner and group.
    #[error("{}: the private key is accessible by other users (mode {mode:03o}); refusing to use it: run `chmod 600 {}`", path.display(), path.display())]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// SHA-256 of a certificate's DER encoding: the protocol's definition of a fingerprint, so the
/// one logged at start is the one clients pin.
pub fn fingerprint_of(cert: &CertificateDer<'_>) -> [u8; 32] {
    cert_fingerprint(cert.as_ref())
}

/// Builds the server's TLS configuration: from `tls_cert`/`tls_key` when both are configured,
/// else from `DATA_DIR/tls/{cert,key}.pem`, generating a self-signed pair there on first start.
/// The data dir itself must already exist or be creatable.
pub fn load_or_create(config: &Config) -> Result<TlsSetup, TlsError> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => load(cert, key),
        _ => {
            let dir = config.data_dir.join(TLS_DIR);
            let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
            if !cert.exists() {
                create_self_signed(&dir, &cert, &key)?;
            } else if !key.exists() {
                return Err(TlsError::MissingKey { cert, key });
            }
            load(&cert, &key)
        }
    }
}

/// Builds the server's TLS configuration from a PEM certificate chain (leaf first) and a PEM
/// private key (PKCS#8, PKCS#1 or SEC1).
pub fn load(cert_path: &Path, key_path: &Path) -> Result<TlsSetup, TlsError> {
    let pem_error = |path: &Path, what| {
        let path = path.to_path_buf();
        move |source| match source {
            rustls_pki_types::pem::Error::Io(source) => TlsError::Io { path, source },
            source => TlsError::Pem { path, what, source },
        }
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(pem_error(cert_path, "certificate"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(cert_path, "certificate"))?;
    let Some(leaf) = certs.first() else {
        return Err(pem_error(cert_path, "certificate")(rustls_pki_types::pem::Error::NoItemsFound));
    };
    let fingerprint = fingerprint_of(leaf);
    check_key_mode(key_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(pem_error(key_path, "private key"))?;

    let mut server = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // Chime connections are long-lived and reconnect rarely, so resumption saves little; without
    // it there is no session cache shared between threads and no tickets sent after each handshake.
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    Ok(TlsSetup { config: Arc::new(server), fingerprint })
}

/// Refuses a private key that others can read (as OpenSSH refuses an unprotected key); a key the
/// file's group can read is allowed with a warning (the `ssl-cert` group convention).
#[cfg(unix)]
fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| TlsError::Io { path: path.to_path_buf(), source })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o007 != 0 {
        return Err(TlsError::KeyExposed { path: path.to_path_buf(), mode });
    }
    if mode & 0o070 != 0 {
        log::warn!("TLS key {} is accessible by its group (mode {mode:03o}); consider chmod 600", path.display());
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_mode(_path: &Path) -> Result<(), TlsError> {
    Ok(())
}

/// Writes a new self-signed certificate and key into `dir`. The key is written first and the
/// certificate last, so an existing `cert.pem` always has its key next to it.
fn create_self_signed(dir: &Path, cert: &Path, key: &Path) -> Result<(), TlsError> {
    create_private_dir(dir).map_err(|source| TlsError::Io { path: dir.to_path_buf(), source })?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Some(host) = hostname() {
        if !names.contains(&host) {
            names.push(host);
        }
    }
    let mut params = rcgen::CertificateParams::new(names)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "chimed self-signed");
    let signing_key = rcgen::KeyPair::generate()?;
    let certificate = params.self_signed(&signing_key)?;

    write_new(key, signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert, certificate.pem().as_bytes(), 0o644)?;
    log::info!(
        "created a self-signed TLS certificate {} (fingerprint {})",
        cert.display(),
        fingerprint_hex(&fingerprint_of(certificate.der()))
    );
    Ok(())
}

/// Writes `path` through a temporary file and a rename, so a crash never leaves a half-written
/// PEM file; the mode is set at creation, so the key is never readable by others.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let io_error = |source| TlsError::Io { path: path.to_path_buf(), source };
    let tmp = path.with_extension("pem.tmp");
    // A temporary file left by an earlier crash is garbage; create_new below must not trip on it.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error(e)),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io_error)?;
    file.write_all(contents).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_error)
}

/// The machine's host name, when it is usable as a DNS name in the certificate.
fn hostname() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    let name = raw.trim().to_ascii_lowercase();
    let usable = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    usable.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir_config(dir: &Path) -> Config {
        Config { data_dir: dir.join("data"), ..Config::default() }
    }

    #[test]
    fn hex_is_lower_case() {
        let mut fp = [0u8; 32];
        fp[0] = 0xAB;
        fp[31] = 0x0f;
        let hex = fingerprint_hex(&fp);
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("ab00"));
        assert!(hex.ends_with("000f"));
    }

    #[test]
    fn self_signed_is_created_once_and_reused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = data_dir_config(tmp.path());
        let first = load_or_create(&config).expect("create");
        let second = load_or_create(&config).expect("reuse");
        assert_eq!(first.fingerprint, second.fingerprint);

        let cert_pem = config.data_dir.join("tls/cert.pem");
        let der = CertificateDer::from_pem_file(&cert_pem).expect("cert");
        assert_eq!(fingerprint_of(&der), first.fingerprint);
        assert!(!config.data_dir.join("tls/key.pem.tmp").exists());
    }

    #[cfg(unix)]
    #[test]
    fn generated_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = data_dir_config(tmp.path());
        load_or_create(&config).expect("create");
        let mode = |p: PathBuf| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(config.data_dir.join("tls")), 0o700);
        assert_eq!(mode(config.data_dir.join("tls/key.pem")), 0o600);
    }

    #[test]
    fn explicit_files_are_used() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let generated = load_or_create(&data_dir_config(tmp.path())).expect("create");
        let config = Config {
            data_dir: tmp.path().join("other"),
            tls_cert: Some(tmp.path().join("data/tls/cert.pem")),
            tls_key: Some(tmp.path().join("data/tls/key.pem")),
            ..Config::default()
        };
        let loaded = load_or_create(&config).expect("load");
        assert_eq!(loaded.fingerprint, generated.fingerprint);
        // Explicit files never cause anything to be generated in the data dir.
        assert!(!config.data_dir.exists());
    }

    #[test]
    fn missing_and_malformed_files_are_errors() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = tmp.path().join("nope.pem");
        let err = load(&missing, &missing).expect_err("missing");
        assert!(matches!(err, TlsError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.pem"), "{err}");

        let empty = tmp.path().join("empty.pem");
        std::fs::write(&empty, "not a pem file\n").expect("write");
        let err = load(&empty, &empty).expect_err("no certificate");
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
    }

    #[test]
    fn certificate_without_key_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = data_dir_config(tmp.path());
        load_or_create(&config).expect("create");
        std::fs::remove_file(config.data_dir.join("tls/key.pem")).expect("remove");
        let err = load_or_create(&config).expect_err("key missing");
        assert!(matches!(err, TlsError::MissingKey { .. }), "{err:?}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = data_dir_config(&tmp.path().join("a"));
        let b = data_dir_config(&tmp.path().join("b"));
        load_or_create(&a).expect("a");
        load_or_create(&b).expect("b");
        let err = load(&a.data_dir.join("tls/cert.pem"), &b.data_dir.join("tls/key.pem")).expect_err("mismatch");
        assert!(matches!(err, TlsError::Rustls(_)), "{err:?}");
    }
}
