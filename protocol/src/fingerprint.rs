//! What a certificate pin is: the SHA-256 of the server's leaf certificate (DER), written as 64
//! lower-case hex digits (`docs/protocol.md` section 1).
//!
//! Clients pin it on first use and the server logs it at start, so both sides must compute and
//! print it the same way; that makes it part of the protocol. Only hashing and hex are needed, no
//! TLS library: the TLS verifier that compares a presented certificate with a pin lives with the
//! client (`chime-client`'s `tls` module).

use sha2::{Digest, Sha256};

/// SHA-256 of a DER certificate, as pinned.
pub fn cert_fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Lower-case hex of a fingerprint, no separators (64 characters).
pub fn fingerprint_hex(fp: &[u8; 32]) -> String {
    hex::encode(fp)
}

/// Parses what [`fingerprint_hex`] prints (colons, as other tools print them, are ignored).
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(clean.trim(), &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_hex_round_trips() {
        let fp = cert_fingerprint(b"cert");
        let hex = fingerprint_hex(&fp);
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(parse_fingerprint(&hex), Some(fp));
        assert_eq!(parse_fingerprint("00:11"), None);
    }

    #[test]
    fn colons_and_upper_case_are_accepted() {
        let fp = [0xab; 32];
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons), Some(fp));
        assert_eq!(parse_fingerprint(&format!(" {} ", fingerprint_hex(&fp))), Some(fp));
    }

    #[test]
    fn known_vector() {
        // SHA-256 of the empty string.
        assert_eq!(
            fingerprint_hex(&cert_fingerprint(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
