//! `chime`, the Chime terminal client: parse the command line, run the command, turn the outcome
//! into an exit code.
//!
//! Exit codes: 0 success, 1 error (one line on stderr: `chime: what and why`), 2 usage error
//! (from clap). A closed stdout (`chime history 3 | head`) counts as success, as in ripgrep.
//! The error line and log lines carry the server's words, so they are escaped for the terminal
//! like human output on stdout ([`output::escape_for_terminal`]).

use chime::{cli, commands, output};
use clap::Parser;
use std::io::{self, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    init_logging();
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, whatever the causes contain.
            let line = format!("{err:#}").replace(['\n', '\r'], " ");
            eprintln!("chime: {}", output::escape_for_terminal(&line));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr as `chime: LEVEL: message`; warnings by default, more with `RUST_LOG`.
fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, record| {
            let message = output::escape_for_terminal(&record.args().to_string());
            writeln!(buf, "chime: {}: {message}", record.level().as_str().to_lowercase())
        })
        .init();
}

/// Whether the error is stdout having been closed by its reader.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| cause.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
}
