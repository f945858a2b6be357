//! Trust on first use for TLS, as `chime` does it and `docs/protocol.md` section 1 asks.
//!
//! Chime servers usually present a self-signed certificate, so there is no CA check. Instead a
//! client pins the SHA-256 of the server's leaf certificate ([`chime_protocol::fingerprint`]) the
//! first time it connects and refuses any other certificate later, like SSH's `known_hosts`. The
//! verifier built by [`tofu_client_config`] does exactly that, and still verifies the handshake
//! signatures, so a pinned fingerprint really binds the connection to the holder of that
//! certificate's key. Both drivers ([`crate::blocking`], [`crate::nonblocking`]) use it; a client
//! that drives rustls itself can too.

use crate::error::ClientError;
use chime_protocol::fingerprint::cert_fingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// The fingerprint a TLS server presented, as recorded by the verifier of a
/// [`tofu_client_config`].
#[derive(Debug, Clone)]
pub struct SeenFingerprint(Arc<TofuVerifier>);

impl SeenFingerprint {
    /// SHA-256 of the server's leaf certificate, once a handshake has reached verification.
    pub fn get(&self) -> Option<[u8; 32]> {
        self.0.seen()
    }
}

/// A rustls client configuration that trusts on first use: with `pinned`, only the certificate
/// with that SHA-256 is accepted; without, any certificate is, and the returned
/// [`SeenFingerprint`] tells which one to pin. Handshake signatures are always verified, so the
/// server proves it holds the certificate's key.
///
/// One configuration may serve many connections (the load generator shares one); the
/// [`SeenFingerprint`] then holds whichever certificate was verified last.
pub fn tofu_client_config(pinned: Option<[u8; 32]>) -> Result<(Arc<ClientConfig>, SeenFingerprint), ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        Arc::new(TofuVerifier { pinned, seen: Mutex::new(None), algs: provider.signature_verification_algorithms });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    Ok((Arc::new(config), SeenFingerprint(verifier)))
}

/// The server name for TLS: the host part of `addr` (`HOST:PORT`, `[v6]:PORT`; a DNS name or an
/// IP literal), else the IP actually connected to. The TOFU verifier ignores it, but rustls sends
/// it as SNI and needs one.
pub fn server_name(addr: &str, peer: SocketAddr) -> ServerName<'static> {
    let host = match addr.rsplit_once(':') {
        Some((h, _port)) => h,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match ServerName::try_from(host.to_string()) {
        Ok(name) => name,
        Err(_) => ServerName::from(peer.ip()),
    }
}

/// Trust-on-first-use certificate verification: any certificate is accepted unless a pinned
/// fingerprint says otherwise, but handshake signatures are checked for real.
#[derive(Debug)]
struct TofuVerifier {
    /// The fingerprint the caller expects, if it has seen this server before.
    pinned: Option<[u8; 32]>,
    /// The fingerprint the server presented.
    seen: Mutex<Option<[u8; 32]>>,
    /// The provider's signature algorithms.
    algs: WebPkiSupportedAlgorithms,
}

impl TofuVerifier {
    fn seen(&self) -> Option<[u8; 32]> {
        // A poisoned lock only means another thread panicked mid-store of a Copy value.
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ServerCertVerifier for TofuVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = cert_fingerprint(end_entity);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
        match self.pinned {
            Some(pinned) if pinned != fp => {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn server_name_from_addr() {
        let peer: SocketAddr = ([127, 0, 0, 1], 7878).into();
        assert_eq!(server_name("localhost:7878", peer), ServerName::try_from("localhost").unwrap());
        assert_eq!(server_name("[::1]:7878", peer), ServerName::from("::1".parse::<IpAddr>().unwrap()));
        assert_eq!(server_name("10.0.0.1:1", peer), ServerName::from(IpAddr::from([10, 0, 0, 1])));
        assert_eq!(server_name("bad_name!:1", peer), ServerName::from(peer.ip()));
    }

    #[test]
    fn a_config_starts_with_nothing_seen() {
        let (_config, seen) = tofu_client_config(Some([1; 32])).expect("config");
        assert_eq!(seen.get(), None);
    }
}
