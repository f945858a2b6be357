//! TLS for the load generator: trust on first use, exactly as `chime` does (see
//! [`chime_client::tls::tofu_client_config`]). The first certificate seen by the setup
//! client is pinned for the run; load connections accept exactly that certificate, or any when
//! nothing is pinned. Handshake signatures are still verified.

use chime_client::tls::tofu_client_config;
use chime_client::ClientError;
use rustls::ClientConfig;
use std::sync::Arc;

/// A client config that trusts the certificate with SHA-256 `pinned`, or any when `None`.
pub fn client_config(pinned: Option<[u8; 32]>) -> Result<Arc<ClientConfig>, ClientError> {
    Ok(tofu_client_config(pinned)?.0)
}
