//! Idempotency keys for `POST` (`docs/protocol.md` section 9): one per message, reused for every
//! retry of it, on any connection, so a post whose reply was lost is never written twice.

use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh idempotency key: 128 random bits as 32 lower-case hex characters.
pub fn new_idempotency_key() -> String {
    let mut bytes = [0u8; 16];
    if rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).is_err() {
        // The OS refused randomness (practically never). A key only has to be unique per room,
        // so time, process and a counter, hashed, are a safe substitute; panicking is not.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = Sha256::new();
        h.update(format!("{:?}", std::time::SystemTime::now()));
        h.update(std::process::id().to_le_bytes());
        h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        bytes.copy_from_slice(&h.finalize()[..16]);
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_fresh_hex() {
        let a = new_idempotency_key();
        let b = new_idempotency_key();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }
}
