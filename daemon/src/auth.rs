//! Passwords, session tokens and the rules for what names an account: user names, email
//! addresses and display names.
//!
//! Password hashing is deliberately slow (argon2id), so the daemon calls [`hash_password`] and
//! [`verify_password`] only on its auth worker threads, never on the event loop. Session tokens
//! are random bearer secrets; the store keeps only their SHA-256 ([`token_hash`]), so a leaked
//! database does not let anyone log in.

use crate::limits::{MAX_DISPLAY_NAME, MAX_EMAIL};
use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;
use sha2::{Digest, Sha256};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Shortest password accepted, in bytes.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password accepted, in bytes: bounds the work one login request can cause.
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Longest user name, in characters (all of them ASCII).
pub const MAX_USER_NAME_LEN: usize = 32;

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The PHC string could not be assembled.
    #[error("password hashing failed: {0}")]
    Phc(#[from] argon2::password_hash::Error),
    /// A PHC field (salt, output) was out of range.
    #[error("password hashing failed: {0}")]
    PhcField(#[from] argon2::password_hash::phc::Error),
    /// Argon2 itself refused (a parameter or length out of range).
    #[error("password hashing failed: {0}")]
    Argon2(#[from] argon2::Error),
}

/// Bytes of random salt per hash (the PHC recommendation).
const SALT_LEN: usize = 16;
/// Bytes of hash output stored.
const OUTPUT_LEN: usize = 32;

/// Argon2id with one memory area, reused by every hash and check made through it.
///
/// Each hash needs `m` KiB of working memory (19 MiB with the parameters below). Allocated per
/// hash and freed, glibc keeps such areas in the thread's arena instead of returning them: a daemon
/// grew by about 135 MB after a few registrations. An auth worker keeps one `Hasher` for its whole
/// life, so it holds exactly one area.
///
/// New hashes are argon2id v19 with the crate's defaults, which follow the OWASP recommendation
/// m=19 MiB, t=2 iterations, p=1 lane (about 20-40 ms on a current server core). Checks read the
/// parameters from the stored PHC string, so raising these later keeps old hashes working.
#[derive(Default)]
pub struct Hasher {
    memory: Vec<Block>,
}

impl Hasher {
    /// Hashes a password with a fresh random salt; returns the PHC string
    /// (`$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH`) to store.
    pub fn hash(&mut self, password: &str) -> Result<String, AuthError> {
        let params = Params::default();
        let mut salt = [0u8; SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        let mut out = [0u8; OUTPUT_LEN];
        self.compute(Algorithm::Argon2id, Version::V0x13, &params, password, &salt, &mut out)?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params)?,
            salt: Some(Salt::new(&salt)?),
            hash: Some(Output::new(&out)?),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` matches a stored PHC string. A malformed PHC string is a mismatch. The
    /// comparison is constant-time (`Output`'s equality).
    pub fn verify(&mut self, password: &str, phc: &str) -> bool {
        let Ok(stored) = PasswordHash::new(phc) else { return false };
        let (Some(salt), Some(expected)) = (&stored.salt, &stored.hash) else { return false };
        let Ok(algorithm) = Algorithm::try_from(stored.algorithm.as_str()) else { return false };
        let version = match stored.version.map(Version::try_from) {
            None => Version::default(),
            Some(Ok(v)) => v,
            Some(Err(_)) => return false,
        };
        let Ok(params) = Params::try_from(&stored) else { return false };
        let mut out = vec![0u8; expected.len()];
        if self.compute(algorithm, version, &params, password, salt.as_ref(), &mut out).is_err() {
            return false;
        }
        Output::new(&out).is_ok_and(|computed| &computed == expected)
    }

    fn compute(
        &mut self,
        algorithm: Algorithm,
        version: Version,
        params: &Params,
        password: &str,
        salt: &[u8],
        out: &mut [u8],
    ) -> Result<(), argon2::Error> {
        let blocks = params.block_count();
        if self.memory.len() < blocks {
            self.memory.resize(blocks, Block::default());
        }
        Argon2::new(algorithm, version, params.clone()).hash_password_into_with_memory(
            password.as_bytes(),
            salt,
            out,
            &mut self.memory[..blocks],
        )
    }
}

/// Hashes a password with a one-off [`Hasher`] (tools and tests; workers keep their own).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    Hasher::default().hash(password)
}

/// Checks a password with a one-off [`Hasher`] (tools and tests; workers keep their own).
pub fn verify_password(password: &str, phc: &str) -> bool {
    Hasher::default().verify(password, phc)
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

/// Checks an email address: at most 254 bytes, exactly one `@` with something on each side, and
/// no spaces or characters that do not show as themselves (controls, format characters such as
/// bidi overrides, unassigned code points). Only the shape: whether mail reaches it is not ours to
/// know. The error says what is wrong.
pub fn validate_email(email: &str) -> Result<(), String> {
    if email.is_empty() {
        return Err("email address is empty (to remove it, clear it instead)".into());
    }
    if email.len() > MAX_EMAIL {
        return Err(format!("email address is {} bytes long, at most {MAX_EMAIL} are allowed", email.len()));
    }
    if let Some(bad) = email.chars().find(|&c| c.is_whitespace() || hidden(c)) {
        return Err(format!("email address contains {bad:?}; spaces and invisible characters are not allowed"));
    }
    match email.split_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !domain.contains('@') => Ok(()),
        _ => Err("email address must have exactly one @ with something on each side".into()),
    }
}

/// Checks a display name and returns it trimmed: 1 to 64 characters after trimming, none of them
/// one that does not show as itself (see [`hidden`]), so a name can neither reorder the text
/// around it nor pass for another by invisible means. Letters of every script, marks, spaces and
/// emoji are fine. The error says what is wrong.
pub fn display_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    let len = name.chars().count();
    if len == 0 {
        return Err("display name is empty".into());
    }
    if len > MAX_DISPLAY_NAME {
        return Err(format!("display name is {len} characters long, at most {MAX_DISPLAY_NAME} are allowed"));
    }
    if let Some(bad) = name.chars().find(|&c| hidden(c) && !JOINERS.contains(&c)) {
        return Err(format!("display name contains {bad:?}, which does not show as a character"));
    }
    Ok(name.to_owned())
}

/// U+200C ZERO WIDTH NON-JOINER and U+200D ZERO WIDTH JOINER: format characters, but ones that
/// Persian and Indic writing and emoji sequences (👩‍💻) need, and that cannot reorder text.
const JOINERS: [char; 2] = ['\u{200c}', '\u{200d}'];

/// Whether a character does not show as itself: controls (Cc), format characters (Cf: bidi
/// overrides and isolates, zero-width spaces, ...), line and paragraph separators, private use and
/// unassigned code points (which a later Unicode may make format characters). The set `chime`
/// escapes in its output, for the same reasons.
fn hidden(c: char) -> bool {
    use GeneralCategory::*;
    matches!(
        c.general_category(),
        Control | Format | LineSeparator | ParagraphSeparator | PrivateUse | Unassigned | Surrogate
    )
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
    fn reused_hasher_agrees_with_the_argon2_crate() {
        use argon2::{PasswordHasher, PasswordVerifier};
        let mut h = Hasher::default();
        let ours = h.hash("pass word 1").expect("hash");
        assert!(Argon2::default().verify_password(b"pass word 1", ours.as_str()).is_ok());
        let theirs = Argon2::default().hash_password(b"pass word 2").expect("hash").to_string();
        assert!(h.verify("pass word 2", &theirs));
        assert!(!h.verify("pass word 1", &theirs));
        // Stored parameters are honoured: a cheaper hash made elsewhere still checks.
        let cheap = Argon2::from(Params::new(1024, 1, 1, None).expect("params"));
        let small = cheap.hash_password(b"pass word 3").expect("hash").to_string();
        assert!(h.verify("pass word 3", &small));
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
    fn email_addresses() {
        for ok in ["a@b", "Ann.Lee+chime@Example.org", "émile@exemple.fr", &format!("{}@x.org", "a".repeat(248))] {
            assert_eq!(validate_email(ok), Ok(()), "{ok}");
        }
        let too_long = format!("{}@x.org", "a".repeat(249));
        for bad in ["", "no-at", "two@@x.org", "a@b@c", "@x.org", "ann@", "ann @x.org", " ann@x.org", "ann@x.org\n"] {
            assert!(validate_email(bad).is_err(), "{bad:?}");
        }
        for bad in [too_long.as_str(), "ann\u{202e}@x.org", "ann@x\u{200b}.org", "ann\t@x.org"] {
            assert!(validate_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display_names() {
        assert_eq!(display_name("  Ann Lee \t").as_deref(), Ok("Ann Lee"));
        assert_eq!(display_name("Zoë 🎉").as_deref(), Ok("Zoë 🎉"));
        // Joiners stay: an emoji ZWJ sequence, a Persian word with a ZWNJ.
        assert_eq!(display_name("👩\u{200d}💻").as_deref(), Ok("👩\u{200d}💻"));
        assert_eq!(display_name("می\u{200c}خواهم").as_deref(), Ok("می\u{200c}خواهم"));
        assert_eq!(display_name(&"é".repeat(64)).map(|n| n.chars().count()), Ok(64), "characters, not bytes");
        for bad in
            ["", "   ", "ann\u{202e}gnp.exe", "a\u{2066}b", "zero\u{200b}width", "two\nlines", "a\u{2028}b", "\u{e000}"]
        {
            assert!(display_name(bad).is_err(), "{bad:?}");
        }
        assert!(display_name(&"n".repeat(65)).is_err());
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
