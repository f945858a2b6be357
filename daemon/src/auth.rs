//! Passwords, session tokens and the rules for user names.
//!
//! Password hashing is deliberately slow (argon2id), so the daemon calls [`hash_password`] and
//! [`verify_password`] only on its auth worker threads, never on the event loop. Session tokens
//! are random bearer secrets; the store keeps only their SHA-256 ([`token_hash`]), so a leaked
//! database does not let anyone log in.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Shortest password accepted, in bytes.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password accepted, in bytes: bounds the work one login request can cause.
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Longest user name, in characters (all of them ASCII).
pub const MAX_USER_NAME_LEN: usize = 32;

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The hashing library failed (out of memory, no OS randomness for the salt).
    #[error("password hashing failed: {0}")]
    Hash(#[from] argon2::password_hash::Error),
}

/// The argon2 instance used for new hashes: argon2id v19 with the crate's defaults, which follow
/// the OWASP recommendation m=19 MiB, t=2 iterations, p=1 lane (about 20-40 ms on a current
/// server core). Verification reads the parameters from the stored PHC string instead, so
/// raising these later keeps old hashes working.
fn hasher() -> Argon2<'static> {
    Argon2::default()
}

/// Hashes a password with a fresh random salt; returns the PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH`) to store.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    Ok(hasher().hash_password(password.as_bytes())?.to_string())
}

/// Whether `password` matches a stored PHC string. A malformed PHC string is a mismatch. The
/// final comparison is constant-time (done by the argon2 crate).
pub fn verify_password(password: &str, phc: &str) -> bool {
    hasher().verify_password(password.as_bytes(), phc).is_ok()
}

/// A new session token: 256 random bits from a CSPRNG seeded by the OS, as 64 lower-case hex
/// characters.
pub fn new_session_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// SHA-256 of a session token: what the store keeps and looks sessions up by. A plain hash is
/// enough (no salt, no slow hash) because tokens are 256 random bits, not guessable passwords.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Checks a new user name: 1 to 32 characters from `A-Z a-z 0-9 _ . -`, not starting with `.`
/// or `-` (so a name is never taken for a flag or a hidden file). The error says what is wrong.
pub fn validate_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("user name is empty".into());
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(format!("user name contains {bad:?}; allowed are letters A-Z a-z, digits and _ . -"));
    }
    if name.len() > MAX_USER_NAME_LEN {
        return Err(format!("user name is {} characters long, at most {MAX_USER_NAME_LEN} are allowed", name.len()));
    }
    if name.starts_with(['.', '-']) {
        return Err("user name must not start with '.' or '-'".into());
    }
    Ok(())
}

/// Checks a new password: 8 to 1024 bytes. The error says what is wrong.
pub fn validate_password(password: &str) -> Result<(), String> {
    let len = password.len();
    if len < MIN_PASSWORD_LEN {
        return Err(format!("password is too short: at least {MIN_PASSWORD_LEN} bytes"));
    }
    if len > MAX_PASSWORD_LEN {
        return Err(format!("password is too long: at most {MAX_PASSWORD_LEN} bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let phc = hash_password("correct horse").expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("correct horsf", &phc));
        assert!(!verify_password("", &phc));
    }

    #[test]
    fn salts_differ() {
        let a = hash_password("same password").expect("hash");
        let b = hash_password("same password").expect("hash");
        assert_ne!(a, b);
        assert!(verify_password("same password", &b));
    }

    #[test]
    fn malformed_hash_is_a_mismatch() {
        assert!(!verify_password("whatever1", ""));
        assert!(!verify_password("whatever1", "$argon2id$garbage"));
        assert!(!verify_password("whatever1", "plain text"));
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = new_session_token();
        let b = new_session_token();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
        assert_eq!(token_hash(&a), token_hash(&a.clone()));
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn token_hash_is_sha256() {
        assert_eq!(hex::encode(token_hash("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn user_names() {
        for ok in ["a", "alice", "Bob_2", "x.y-z", "_under", &"n".repeat(32)] {
            assert_eq!(validate_user_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".hidden", "-flag", "has space", "émile", "a/b", "a:b", &"n".repeat(33)] {
            assert!(validate_user_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords() {
        assert!(validate_password("1234567").is_err());
        assert_eq!(validate_password("12345678"), Ok(()));
        assert_eq!(validate_password(&"p".repeat(1024)), Ok(()));
        assert!(validate_password(&"p".repeat(1025)).is_err());
        // Bytes, not characters: four 2-byte characters are 8 bytes.
        assert_eq!(validate_password("éééé"), Ok(()));
    }
}
