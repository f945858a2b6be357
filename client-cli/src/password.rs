//! Getting the password for `register` and `login` without ever echoing it.
//!
//! In order: `--password-stdin` (the first line of stdin; an explicit flag wins), the
//! `CHIME_PASSWORD` environment variable, then a prompt on the terminal with echo off.

use anyhow::{bail, Context, Result};
use std::io::{self, BufRead};

/// The environment variable holding a password.
pub const PASSWORD_ENV: &str = "CHIME_PASSWORD";

/// The password for `user`; `confirm` asks twice when prompting (for a new account).
pub fn password(from_stdin: bool, user: &str, confirm: bool) -> Result<String> {
    if from_stdin {
        return first_line(io::stdin().lock());
    }
    if let Some(value) = std::env::var_os(PASSWORD_ENV) {
        return value.into_string().map_err(|_| anyhow::anyhow!("{PASSWORD_ENV} is not UTF-8"));
    }
    let no_terminal =
        || format!("cannot prompt for a password (no terminal?); set {PASSWORD_ENV} or pass --password-stdin");
    let first = rpassword::prompt_password(format!("Password for {user}: ")).with_context(no_terminal)?;
    if confirm {
        let again = rpassword::prompt_password("Repeat the password: ").with_context(no_terminal)?;
        if again != first {
            bail!("the passwords differ");
        }
    }
    Ok(first)
}

/// The first line of `input`, without its line ending.
fn first_line(mut input: impl BufRead) -> Result<String> {
    let mut line = String::new();
    let read = input.read_line(&mut line).context("cannot read the password from stdin")?;
    if read == 0 {
        bail!("--password-stdin: stdin is empty");
    }
    let trimmed = line.strip_suffix('\n').unwrap_or(&line);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_gives_the_first_line_only() {
        assert_eq!(first_line(&b"s3cret\nmore\n"[..]).expect("line"), "s3cret");
        assert_eq!(first_line(&b"dos\r\n"[..]).expect("line"), "dos");
        assert_eq!(first_line(&b"no newline"[..]).expect("line"), "no newline");
        assert_eq!(first_line(&b" spaces kept \n"[..]).expect("line"), " spaces kept ");
        assert!(first_line(&b""[..]).is_err());
    }
}
